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


def label_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Label logits ``[B, 4]`` (``LABELS`` order) at the last position of a left-padded batch.

    ``model`` is a causal LM (or a peft/DDP wrapper of one) with the label head
    attached. Extra keys in ``batch`` (``labels``) are ignored.
    """
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch.get("position_ids"),
        logits_to_keep=1,
        use_cache=False,
    )
    logits = out.logits[:, -1, :]
    if logits.shape[-1] != len(LABELS):
        raise RuntimeError(f"expected {len(LABELS)} label logits, got {logits.shape[-1]}: is the label head attached?")
    return logits


def score_from_probs(probs: torch.Tensor) -> torch.Tensor:
    """Ranking score in [0, 1]: ``(3·P(E) + 2·P(S) + 1·P(C) + 0·P(I)) / 3``. ``probs: [..., 4]``."""
    gains = torch.tensor([LABEL_GAIN[label] for label in LABELS], dtype=probs.dtype, device=probs.device)
    return probs @ gains / max(LABEL_GAIN.values())


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------
def pick_attn_implementation(no_flash_attn: bool = False) -> str:
    """``flash_attention_2`` when flash-attn is installed and CUDA is available, else ``sdpa``."""
    if not no_flash_attn and torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


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


def check_reranker_config(model_dir: str, tokenizer) -> dict | None:
    """Read ``reranker_config.json`` from ``model_dir`` and refuse prompt or label drift."""
    path = os.path.join(model_dir, LABEL_CONFIG_NAME)
    if not os.path.exists(path):
        logger.warning("%s has no %s; assuming the current prompt and labels", model_dir, LABEL_CONFIG_NAME)
        return None
    with open(path) as f:
        saved = json.load(f)
    current = reranker_config(tokenizer, saved.get("base_model", ""))
    for key in ("prompt_version", "labels", "label_token_ids"):
        if saved.get(key) != current[key]:
            raise ValueError(
                f"{path}: {key} is {saved.get(key)!r} but this code uses {current[key]!r}; "
                "the adapter was trained with a different prompt or tokenizer"
            )
    return saved
