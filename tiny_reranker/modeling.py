"""Loading a reranker: the base causal LM, its dtype and attention kernel, the 4-row label head, and LoRA.

The reranker reads the hidden state at the last prompt position and projects it
onto the four label-token rows of the output embedding only::

    label_logits = last_hidden @ W[label_ids].T      # [B, 4], never [B, L, vocab]

:class:`LabelRowsHead` replaces ``lm_head`` so that the model's own forward
(and therefore DDP, peft and gradient checkpointing) computes exactly this.
With ``logits_to_keep=1`` and left padding, the causal LM returns ``[B, 1, 4]``
(``tiny_reranker.forward`` runs it).
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from esci_dataset import ESCIDataError, label_token_ids
from tiny_reranker.contract import LABEL_CONFIG_NAME, check_reranker_config
from tiny_reranker.model_files import check_safetensors_only

logger = logging.getLogger(__name__)


def silence_third_party_warnings() -> None:
    """Hide deprecation warnings a user of this toolkit cannot act on (called once, at import).

    peft reads transformers' deprecated ``is_gradient_checkpointing`` on every adapter load.
    """
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated", category=FutureWarning)


silence_third_party_warnings()

DEFAULT_LORA_TARGETS = "q_proj,v_proj"


# ---------------------------------------------------------------------------
# The head
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


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------
def pick_attn_implementation(no_flash_attn: bool = False, dtype: torch.dtype | None = None) -> str:
    """``flash_attention_2`` when flash-attn is installed and the GPU runs it (Ampere or newer) in ``dtype``,
    else ``sdpa``. flash-attn kernels only run in fp16/bf16, so fp32 gets sdpa."""
    from transformers.utils import is_flash_attn_2_available

    if (not no_flash_attn and dtype != torch.float32 and torch.cuda.is_available() and is_flash_attn_2_available()
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

    attn = pick_attn_implementation(no_flash_attn, dtype)
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
# A reranker: base model (+ adapter) with the label head
# ---------------------------------------------------------------------------
def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def reranker_tokenizer(base_model: str, lora_model: str | None = None):
    """The adapter folder's tokenizer when it holds one (the one training used), else the base model's."""
    base_model = os.path.expanduser(base_model)
    lora_model = os.path.expanduser(lora_model) if lora_model else None
    has_tokenizer = lora_model and os.path.exists(os.path.join(lora_model, "tokenizer_config.json"))
    return load_tokenizer(lora_model if has_tokenizer else base_model)


def load_reranker(base_model: str, lora_model: str | None = None, dtype: torch.dtype = torch.float32,
                  no_flash_attn: bool = False, device: torch.device | str | None = None, tokenizer=None):
    """Base model (+ LoRA adapter) with the 4-row label head, in eval mode. Returns ``(model, tokenizer)``.

    A LoRA adapter is merged into the weights, in float32, before the cast to ``dtype``, as export.py merges:
    inference then runs the plain model (an unmerged adapter adds two matmuls per target module, which cost
    4x the whole forward on the tiny test model), and ``dtype`` rounds the same merged weights an export holds.

    The tokenizer (``tokenizer``, else loaded) comes from the adapter folder when it holds one (it is the
    one training used), else from the base model. A ``reranker_config.json``
    (next to the adapter, or in a merged export) is checked for prompt drift.
    """
    base_model = os.path.expanduser(base_model)
    lora_model = os.path.expanduser(lora_model) if lora_model else None
    tokenizer = tokenizer or reranker_tokenizer(base_model, lora_model)
    model = load_base_model(base_model, dtype=torch.float32 if lora_model else dtype, no_flash_attn=no_flash_attn)
    if lora_model:
        from peft import PeftModel

        check_reranker_config(lora_model, tokenizer, base_model)
        try:
            model = PeftModel.from_pretrained(model, lora_model)
        except RuntimeError as exc:  # e.g. adapter shapes from another base model
            raise ESCIDataError(f"--lora_model {lora_model} does not fit --base_model {base_model}: "
                                f"{str(exc).splitlines()[0]}") from None
        broken = non_finite_names((name, p) for name, p in model.named_parameters() if "lora_" in name)
        if broken:  # every pair would score NaN, and an export would serve NaN
            raise ESCIDataError(
                f"--lora_model {lora_model}: {len(broken)} adapter tensor(s) hold NaN or inf (first: {broken[0]}), "
                f"so every pair would score NaN. It was probably saved after training diverged: use an earlier "
                f"checkpoint-* folder, or train again with a lower --learning_rate.")
        model = model.merge_and_unload().to(dtype)
        model.set_attn_implementation(pick_attn_implementation(no_flash_attn, dtype))  # loaded as fp32: sdpa
    elif os.path.isfile(os.path.join(base_model, LABEL_CONFIG_NAME)):
        check_reranker_config(base_model, tokenizer)  # a merged export (export.py --format merged)
    attach_label_head(model, label_token_ids(tokenizer))
    model.to(device or default_device()).eval()
    return model, tokenizer
