"""Model loading and the 4-row label head, shared by training and evaluation.

The reranker reads the hidden state at the last prompt position and projects it
onto the four label-token rows of the output embedding only::

    label_logits = last_hidden @ W[label_ids].T      # [B, 4], never [B, L, vocab]

:class:`LabelRowsHead` replaces ``lm_head`` so that the model's own forward
(and therefore DDP, peft and gradient checkpointing) computes exactly this.
With ``logits_to_keep=1`` and left padding, the causal LM returns ``[B, 1, 4]``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import warnings
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from esci_dataset import (
    DEFAULT_TEMPLATE,
    INSTRUCT,
    SCORE_WEIGHTS,
    LABELS,
    PROMPT_VERSION,
    TEMPLATES_BY_VERSION,
    ESCIDataError,
    PromptTemplate,
    label_token_ids,
    label_words,
)

logger = logging.getLogger(__name__)


def silence_third_party_warnings() -> None:
    """Hide deprecation warnings a user of this toolkit cannot act on (called once, at import).

    peft reads transformers' deprecated ``is_gradient_checkpointing`` on every adapter load.
    """
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated", category=FutureWarning)


silence_third_party_warnings()

LABEL_CONFIG_NAME = "reranker_config.json"
DEFAULT_LORA_TARGETS = "q_proj,v_proj"


# ---------------------------------------------------------------------------
# The head and the score
# ---------------------------------------------------------------------------
class LabelRowsHead(nn.Module):
    """``lm_head`` narrowed to the label rows: ``hidden [..., H] -> logits [..., 4]``.

    ``weight`` is the model's own output embedding (tied to the input embedding
    for Qwen3); it is shared, not copied, so LoRA training and merging see the
    same tensor. ``full_head`` keeps the original module for :func:`detach_label_head`.
    """

    def __init__(self, full_head: nn.Linear, label_ids: Sequence[int]):
        super().__init__()
        self.weight = full_head.weight
        self.register_buffer("label_ids", torch.tensor(list(label_ids), dtype=torch.long), persistent=False)
        self.full_head = [full_head]  # a list, so it is not registered twice as a submodule

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight[self.label_ids])


def attach_label_head(causal_lm: nn.Module, label_ids: Sequence[int]) -> nn.Module:
    """Swap ``causal_lm.lm_head`` for a :class:`LabelRowsHead` (in place) and return the model."""
    head = causal_lm.get_output_embeddings()
    if not isinstance(head, LabelRowsHead):
        causal_lm.lm_head = LabelRowsHead(head, label_ids)
    return causal_lm


def detach_label_head(causal_lm: nn.Module) -> nn.Module:
    """Undo :func:`attach_label_head` (before saving or exporting a full model)."""
    head = causal_lm.lm_head
    if isinstance(head, LabelRowsHead):
        causal_lm.lm_head = head.full_head[0]
    return causal_lm


def label_logits(model: nn.Module, batch: dict[str, torch.Tensor], prefix_kv=None) -> torch.Tensor:
    """Label logits ``[B, 4]`` (``LABELS`` order) at the last token of each prompt.

    ``model`` is a causal LM (or a peft/DDP wrapper of one) with the label head
    attached. ``batch`` is one of:

    * left-padded (``batching.collate_left_padded``): ``input_ids``, ``attention_mask``,
      ``position_ids`` ``[B, L]``; the last position is read;
    * packed, padding-free (``batching.collate_packed``): ``input_ids``, ``position_ids``
      ``[1, T]``, ``last_token_mask`` ``[1, T]`` marking each prompt's end, and the varlen
      kwargs that ``flash_attention_2`` and ``varlen.VARLEN_ATTENTION`` read.

    With ``prefix_kv`` (a ``batching.PrefixKV``), a batch collated with ``skip_prefix``
    holds only what follows the shared prefix, whose keys/values are reused instead of
    recomputed. A packed one then needs one of those two attention implementations.
    Extra keys (``labels``) are ignored.
    """
    if "last_token_mask" in batch:
        from batching import packed_forward_kwargs

        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                    logits_to_keep=batch["last_token_mask"], **packed_forward_kwargs(batch, prefix_kv))
        logits = out.logits.reshape(-1, out.logits.shape[-1])
    elif prefix_kv is not None:
        n_rows = batch["input_ids"].shape[0]
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=torch.cat([prefix_kv.mask(n_rows), batch["attention_mask"]], dim=1),
            position_ids=batch["position_ids"] + prefix_kv.length,
            logits_to_keep=1,
            use_cache=True,
            **prefix_kv.cache_kwargs(n_rows),
        )
        logits = out.logits[:, -1, :]
    else:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch.get("position_ids"), logits_to_keep=1, use_cache=False)
        logits = out.logits[:, -1, :]
    if logits.shape[-1] != len(LABELS):
        raise RuntimeError(f"expected {len(LABELS)} label logits, got {logits.shape[-1]}: is the label head attached?")
    return logits


def scores_from_probs(probs) -> np.ndarray:
    """Ranking score in [0, 1]: ``(3·P(E) + 2·P(S) + 1·P(C) + 0·P(I)) / 3``. ``probs: [..., 4]`` -> ``[...]``.

    The one score function: numpy in, float64 out (torch tensors are converted).
    """
    weights = np.array([SCORE_WEIGHTS[label] for label in LABELS], dtype=np.float64)
    probs = probs.detach().cpu().numpy() if isinstance(probs, torch.Tensor) else np.asarray(probs)
    return probs.astype(np.float64) @ weights / weights.max()


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------
def pick_attn_implementation(no_flash_attn: bool = False) -> str:
    """``flash_attention_2`` when flash-attn is installed and the GPU runs it (Ampere or newer), else ``sdpa``."""
    if (not no_flash_attn and torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None
            and torch.cuda.get_device_capability()[0] >= 8):
        return "flash_attention_2"
    return "sdpa"


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 matmul (avx512_bf16 or AMX); elsewhere bf16 is slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_dtype() -> torch.dtype:
    """bf16 on CUDA and on CPUs with native bf16, fp32 elsewhere."""
    if torch.cuda.is_available() or cpu_has_fast_bf16():
        return torch.bfloat16
    return torch.float32


DTYPES = {"auto": None, "fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def resolve_dtype(dtype: "torch.dtype | str | None") -> torch.dtype:
    """A torch dtype, a name (``fp32``, ``bf16``, ...) or ``auto``/None (:func:`default_dtype`)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES.get(dtype) or default_dtype()


PICKLE_WEIGHT_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "adapter_model.bin", "training_args.bin")


def _is_pickle_weights(name: str) -> bool:
    return name in PICKLE_WEIGHT_NAMES[:3] or (name.startswith("pytorch_model-") and name.endswith(".bin"))


def _is_safetensors_weights(name: str) -> bool:
    """The names transformers and peft load weights from: model(-0000i-of-0000n).safetensors (+ index),
    adapter_model.safetensors. Any other ``*.safetensors`` in the folder is not what would be loaded."""
    return name in ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors") or (
        name.startswith("model-") and name.endswith(".safetensors"))


def check_safetensors_only(folder: str, what: str) -> None:
    """Refuse a folder whose weights exist only as pickles: unpickling can run code. ESCIDataError otherwise.

    A pickle next to an unrelated ``*.safetensors`` file is still refused: the loaders would read the pickle.
    """
    if not os.path.isdir(folder):
        return
    names = os.listdir(folder)
    if any(_is_safetensors_weights(n) for n in names):
        return
    pickles = sorted(n for n in names if _is_pickle_weights(n))
    if pickles:
        raise ESCIDataError(
            f"{what} {folder}: holds only pickle weights ({', '.join(pickles)}). Only safetensors are loaded, because "
            "loading a pickle can run code. In a trusted environment, load it once with transformers (or peft for an "
            "adapter) and save_pretrained() it to a new folder: safetensors is the default format.")


def check_hub_reachable(name: str, what: str, timeout: float = 10.0) -> None:
    """For a hub id that is not in the local cache, fail in seconds when the hub cannot be reached.

    Without this, an offline machine spends most of a minute in download retries before the
    same error. Local folders and cached ids are not checked.
    """
    if os.path.isdir(os.path.expanduser(name)):
        return
    from huggingface_hub import HfApi, constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return
    if constants.HF_HUB_OFFLINE:
        raise ESCIDataError(f"{what} {name!r} is not a local folder, is not in the Hugging Face cache, and "
                            "HF_HUB_OFFLINE is set; download it where there is network and pass the local folder instead")
    if name in _REACHABLE_HUB_IDS:  # the CLIs check before reading input, then again when loading
        return
    try:
        HfApi().model_info(name, timeout=timeout)
    except Exception as exc:  # unreachable host, unknown repo, gated repo: all mean "pass a local folder"
        raise ESCIDataError(f"{what} {name!r} is not a local folder and could not be fetched from the Hugging Face "
                            f"hub ({type(exc).__name__}); download it where there is network and pass the "
                            "local folder instead") from None
    _REACHABLE_HUB_IDS.add(name)


_REACHABLE_HUB_IDS: set[str] = set()  # hub ids this process already found reachable


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(path: str, dtype: torch.dtype = torch.float32, no_flash_attn: bool = False):
    """Load the causal LM with the chosen attention kernel. Raises OSError if it is not there."""
    from transformers import AutoModelForCausalLM

    attn = pick_attn_implementation(no_flash_attn)
    if attn == "flash_attention_2" and dtype == torch.float32:
        attn = "sdpa"  # flash-attn kernels only run in fp16/bf16
    logger.info("loading %s (dtype=%s, attn_implementation=%s)", path, dtype, attn)
    check_safetensors_only(path, "base model")
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn, use_safetensors=True)


def non_finite_names(named_tensors) -> list[str]:
    """The names, in order, of the ``(name, tensor)`` pairs whose tensor holds NaN or inf."""
    return [name for name, tensor in named_tensors if not bool(torch.isfinite(tensor).all())]


def parse_target_modules(spec: str) -> str | list[str]:
    """``"q_proj,v_proj"`` -> list; ``"all-linear"`` stays a string (peft's keyword)."""
    spec = spec.strip()
    if spec == "all-linear":
        return spec
    modules = [m.strip() for m in spec.split(",") if m.strip()]
    if not modules:
        raise ValueError("--lora_target_modules is empty")
    if "lm_head" in modules:
        raise ValueError("lm_head is tied to the input embeddings in Qwen3; it must not be a LoRA target")
    return modules


def apply_lora(model, r: int, alpha: int, dropout: float, target_modules: str):
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=parse_target_modules(target_modules),
    )
    return get_peft_model(model, config)


# ---------------------------------------------------------------------------
# The label/prompt contract saved next to an adapter
# ---------------------------------------------------------------------------
# Why a stored temperature is applied by default: it never changes the predicted label (the argmax), so
# tasks 2 and 3 are untouched; it makes the probabilities mean what they say, and the ranking score is an
# expected gain *under those probabilities*, so it is the calibrated score that estimates what its formula
# claims. It can reorder items by score: eval.py reports nDCG with and without it, and --no_temperature
# (eval.py, predict.py) or Reranker(temperature=1.0) scores the raw logits.
TEMPERATURE_NOTE = ("the four label logits are divided by this before the softmax; fitted on the held-out split by "
                    "train.py --calibrate. It never changes the predicted label but can reorder items by score; "
                    "eval.py / predict.py --no_temperature score the raw logits. null: none fitted")


def reranker_config(tokenizer, base_model: str, template: PromptTemplate = DEFAULT_TEMPLATE,
                    instruction: str | None = None, temperature: float | None = None) -> dict:
    """What an adapter was trained with: labels, their token ids, the exact prompt template, and the
    calibration temperature (None when none was fitted)."""
    return {
        "prompt_version": PROMPT_VERSION,
        "labels": list(LABELS),
        "label_words": label_words(tokenizer),
        "label_token_ids": label_token_ids(tokenizer),
        "base_model": base_model,
        "instruction": instruction or INSTRUCT,
        "prompt_template": template.to_dict(),
        "temperature": None if temperature is None else float(temperature),
        "temperature_note": TEMPERATURE_NOTE,
    }


def save_reranker_config(output_dir: str, tokenizer, base_model: str, template: PromptTemplate = DEFAULT_TEMPLATE,
                         instruction: str | None = None, temperature: float | None = None) -> None:
    with open(os.path.join(output_dir, LABEL_CONFIG_NAME), "w") as f:
        json.dump(reranker_config(tokenizer, base_model, template, instruction, temperature), f, indent=2)


def read_json_object(path: str) -> dict:
    """A JSON object from ``path``; an unreadable, empty or non-object file is an ESCIDataError naming it."""
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError) as exc:
        raise ESCIDataError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(value, dict):
        raise ESCIDataError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def read_reranker_config(model_dir: str) -> dict | None:
    """``reranker_config.json`` of ``model_dir`` (None when there is none); a corrupt one is an ESCIDataError."""
    path = os.path.join(model_dir, LABEL_CONFIG_NAME)
    return read_json_object(path) if os.path.exists(path) else None


def check_reranker_config(model_dir: str, tokenizer, base_model: str | None = None) -> dict | None:
    """Read ``reranker_config.json`` from ``model_dir`` and refuse label or prompt drift (ESCIDataError)."""
    path = os.path.join(model_dir, LABEL_CONFIG_NAME)
    saved = read_reranker_config(model_dir)
    if saved is None:
        logger.warning("%s has no %s; assuming the current prompt and labels", model_dir, LABEL_CONFIG_NAME)
        return None
    if base_model is not None and saved.get("base_model") and os.path.basename(os.path.normpath(saved["base_model"])) \
            != os.path.basename(os.path.normpath(base_model)):
        logger.warning("%s was trained on %s but is being loaded on %s: scores are only meaningful on the same base",
                       model_dir, saved["base_model"], base_model)
    current = reranker_config(tokenizer, saved.get("base_model", ""))
    for key in ("labels", "label_token_ids"):
        if saved.get(key) != current[key]:
            raise ESCIDataError(f"{path}: {key} is {saved.get(key)!r} but this code and tokenizer give {current[key]!r}; "
                                "the adapter was trained with other labels or another tokenizer")
    template_from_config(saved, path)  # a known prompt, or one stored with the adapter
    temperature_from_config(saved, path)
    return saved


def template_from_config(saved: dict | None, source: str = LABEL_CONFIG_NAME) -> PromptTemplate:
    """The prompt an adapter was trained with: its stored template, else its version's, else today's default."""
    if saved is None:
        return DEFAULT_TEMPLATE
    if "prompt_template" in saved:
        return PromptTemplate.from_dict(saved["prompt_template"], f"{source}: prompt_template")
    version = saved.get("prompt_version")
    if version not in TEMPLATES_BY_VERSION:
        raise ESCIDataError(f"{source}: prompt_version {version!r} stores no template and is unknown to this code "
                            f"(known: {', '.join(TEMPLATES_BY_VERSION)}); the adapter was trained with a different prompt")
    return TEMPLATES_BY_VERSION[version]


def temperature_from_config(saved: dict | None, source: str = LABEL_CONFIG_NAME) -> float | None:
    """The calibration temperature stored with an adapter or merged export; None when there is none.

    Scoring divides the four label logits by it before the softmax. Anything but a positive finite
    number (or null / no key) is an ESCIDataError naming ``source``.
    """
    value = (saved or {}).get("temperature")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ESCIDataError(f"{source}: temperature must be a positive number or null, got {value!r}")
    return float(value)
