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
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from esci_dataset import LABEL_GAIN, LABELS, PROMPT_VERSION, label_token_ids, label_words

logger = logging.getLogger(__name__)

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


def label_logits(model: nn.Module, batch: dict[str, torch.Tensor], prefix_kv: "PrefixKV | None" = None) -> torch.Tensor:
    """Label logits ``[B, 4]`` (``LABELS`` order) at the last token of each prompt.

    ``model`` is a causal LM (or a peft/DDP wrapper of one) with the label head
    attached. ``batch`` is one of:

    * left-padded (``collate_left_padded``): ``input_ids``, ``attention_mask``,
      ``position_ids`` ``[B, L]``; the last position is read;
    * packed, padding-free (``collate_packed``): ``input_ids``, ``position_ids``
      ``[1, T]`` and ``last_token_mask`` ``[1, T]`` marking each prompt's end.

    With ``prefix_kv`` (see :func:`encode_prefix`), a left-padded batch holds only
    what follows the shared prefix, whose keys/values are reused instead of recomputed.
    Extra keys (``labels``) are ignored.
    """
    if "last_token_mask" in batch:
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                    logits_to_keep=batch["last_token_mask"], use_cache=False)
        logits = out.logits.reshape(-1, out.logits.shape[-1])
    elif prefix_kv is not None:
        n_rows = batch["input_ids"].shape[0]
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=torch.cat([prefix_kv.mask(n_rows), batch["attention_mask"]], dim=1),
            position_ids=batch["position_ids"] + prefix_kv.length,
            logits_to_keep=1,
            use_cache=True,
            **cache_kwargs(prefix_kv.cache(n_rows)),
        )
        logits = out.logits[:, -1, :]
    else:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch.get("position_ids"), logits_to_keep=1, use_cache=False)
        logits = out.logits[:, -1, :]
    if logits.shape[-1] != len(LABELS):
        raise RuntimeError(f"expected {len(LABELS)} label logits, got {logits.shape[-1]}: is the label head attached?")
    return logits


class PrefixKV:
    """Keys/values of a prompt prefix shared by every pair (system turn + instruction).

    Computed once with batch size 1; :meth:`cache` hands each batch its own
    cache whose rows view the same prefix, so the prefix costs nothing per pair.
    """

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor]]):
        self.layers = layers
        self.length = layers[0][0].shape[-2]

    def cache(self, n_rows: int):
        from transformers import DynamicCache

        return DynamicCache(ddp_cache_data=[(k.expand(n_rows, -1, -1, -1), v.expand(n_rows, -1, -1, -1))
                                            for k, v in self.layers])

    def mask(self, n_rows: int) -> torch.Tensor:
        device = self.layers[0][0].device
        return torch.ones((n_rows, self.length), dtype=torch.long, device=device)


def encode_prefix(model: nn.Module, prefix_ids: Sequence[int]) -> PrefixKV:
    """Run the shared prefix once (batch size 1) and keep its per-layer keys/values.

    Under ``torch.inference_mode`` for scoring. In training it runs with autograd:
    the rows of a batch then all attend to the same prefix keys/values, and their
    gradients flow back through them once (``expand`` sums them), which equals
    running the prefix in every row (tested), at a fraction of the tokens.
    """
    device = next(model.parameters()).device
    ids = torch.tensor([list(prefix_ids)], dtype=torch.long, device=device)
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=1, use_cache=True)
    cache = out["cache"] if "cache" in out else out["past_key_values"]
    return PrefixKV([(layer.keys, layer.values) for layer in cache.layers])


def cache_kwargs(cache) -> dict:
    """transformers renamed ``past_key_values`` to ``cache`` during 5.x; pass it under the name this version uses."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return {"cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values": cache}


def score_from_probs(probs: torch.Tensor) -> torch.Tensor:
    """Ranking score in [0, 1]: ``(3·P(E) + 2·P(S) + 1·P(C) + 0·P(I)) / 3``. ``probs: [..., 4]``."""
    gains = torch.tensor([LABEL_GAIN[label] for label in LABELS], dtype=probs.dtype, device=probs.device)
    return probs @ gains / max(LABEL_GAIN.values())


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
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn)


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
def reranker_config(tokenizer, base_model: str) -> dict:
    return {
        "prompt_version": PROMPT_VERSION,
        "labels": list(LABELS),
        "label_words": label_words(tokenizer),
        "label_token_ids": label_token_ids(tokenizer),
        "base_model": base_model,
    }


def save_reranker_config(output_dir: str, tokenizer, base_model: str) -> None:
    with open(os.path.join(output_dir, LABEL_CONFIG_NAME), "w") as f:
        json.dump(reranker_config(tokenizer, base_model), f, indent=2)


def check_reranker_config(model_dir: str, tokenizer, base_model: str | None = None) -> dict | None:
    """Read ``reranker_config.json`` from ``model_dir`` and refuse prompt or label drift."""
    path = os.path.join(model_dir, LABEL_CONFIG_NAME)
    if not os.path.exists(path):
        logger.warning("%s has no %s; assuming the current prompt and labels", model_dir, LABEL_CONFIG_NAME)
        return None
    with open(path) as f:
        saved = json.load(f)
    current = reranker_config(tokenizer, saved.get("base_model", ""))
    if base_model is not None and saved.get("base_model") and os.path.basename(os.path.normpath(saved["base_model"])) \
            != os.path.basename(os.path.normpath(base_model)):
        logger.warning("%s was trained on %s but is being loaded on %s: scores are only meaningful on the same base",
                       model_dir, saved["base_model"], base_model)
    for key in ("prompt_version", "labels", "label_token_ids"):
        if saved.get(key) != current[key]:
            raise ValueError(
                f"{path}: {key} is {saved.get(key)!r} but this code uses {current[key]!r}; "
                "the adapter was trained with a different prompt or tokenizer"
            )
    return saved
