"""Scoring with a trained (or zero-shot) reranker: the one inference path.

``eval.py`` and the :class:`Reranker` API both call :func:`score_token_ids`, so
the same pair gets the same numbers wherever it is scored.
"""

from __future__ import annotations

import logging
import os
from typing import Iterable, Sequence

import numpy as np
import torch

from esci_dataset import LABELS, PromptEncoder, collate_left_padded, label_token_ids
from modeling import attach_label_head, check_reranker_config, label_logits, load_base_model, load_tokenizer, score_from_probs

logger = logging.getLogger(__name__)

PROB_COLUMNS = tuple(f"p_{label}" for label in LABELS)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_reranker(base_model: str, lora_model: str | None = None, dtype: torch.dtype = torch.float32,
                  no_flash_attn: bool = False, device: torch.device | str | None = None):
    """Base model (+ LoRA adapter) with the 4-row label head, in eval mode. Returns ``(model, tokenizer)``.

    The tokenizer comes from the adapter folder when it holds one (it is the
    one training used), else from the base model.
    """
    has_tokenizer = lora_model and os.path.exists(os.path.join(lora_model, "tokenizer_config.json"))
    tokenizer = load_tokenizer(lora_model if has_tokenizer else base_model)
    model = load_base_model(base_model, dtype=dtype, no_flash_attn=no_flash_attn)
    if lora_model:
        from peft import PeftModel

        check_reranker_config(lora_model, tokenizer)
        model = PeftModel.from_pretrained(model, lora_model)
    attach_label_head(model.get_base_model() if lora_model else model, label_token_ids(tokenizer))
    model.to(device or default_device()).eval()
    return model, tokenizer


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[np.ndarray]:
    """Indices grouped into batches of similar length (longest first, so OOM shows up at once)."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@torch.inference_mode()
def score_token_ids(model, token_ids: Sequence[Sequence[int]], pad_token_id: int, batch_size: int = 32,
                    progress: bool = False) -> np.ndarray:
    """Label probabilities ``[N, 4]`` (``LABELS`` order, float64) for encoded prompts, in input order.

    Batches are length-sorted and left-padded; results are scattered back to
    the input order, so the output never depends on batching.
    """
    device = next(model.parameters()).device
    probs = np.zeros((len(token_ids), len(LABELS)), dtype=np.float64)
    batches = length_sorted_batches([len(t) for t in token_ids], batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="scoring", unit="batch")
    for idx in batches:
        batch = collate_left_padded([{"input_ids": token_ids[i]} for i in idx], pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = label_logits(model, batch).float()
        probs[idx] = torch.softmax(logits, dim=-1).double().cpu().numpy()
    return probs


def scores_from_probs(probs: np.ndarray) -> np.ndarray:
    """Numpy front of :func:`modeling.score_from_probs`."""
    return score_from_probs(torch.from_numpy(np.asarray(probs, dtype=np.float64))).numpy()


class Reranker:
    """Score (query, item_text) pairs with the 4-class reranker.

    >>> rr = Reranker.from_pretrained("Qwen/Qwen3-0.6B", lora_model="outputs/lora")
    >>> rr.rank("usb c charger", ["Anker 65W USB-C charger", "HDMI cable"])[0]["item"]
    """

    def __init__(self, model, tokenizer, max_length: int = 512, batch_size: int = 32):
        self.model, self.tokenizer = model, tokenizer
        self.encoder = PromptEncoder(tokenizer, max_length)
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(cls, base_model: str, lora_model: str | None = None, device: str | None = None,
                        dtype: torch.dtype | None = None, max_length: int = 512, batch_size: int = 32,
                        no_flash_attn: bool = False) -> "Reranker":
        model, tokenizer = load_reranker(base_model, lora_model, dtype or torch.float32, no_flash_attn, device)
        return cls(model, tokenizer, max_length, batch_size)

    def predict_probs(self, queries: Sequence[str], items: Sequence[str], progress: bool = False) -> np.ndarray:
        """``[N, 4]`` probabilities for aligned query/item lists. Empty strings are scored as given."""
        token_ids = []
        for start in range(0, len(queries), 4096):
            token_ids += self.encoder.encode_batch(queries[start:start + 4096], items[start:start + 4096])
        return score_token_ids(self.model, token_ids, self.tokenizer.pad_token_id, self.batch_size, progress)

    def predict(self, pairs: Iterable[tuple[str, str]]) -> list[dict]:
        """Per pair: ``p_E, p_S, p_C, p_I, score, pred_label``, in input order."""
        pairs = list(pairs)
        if not pairs:
            return []
        probs = self.predict_probs([q for q, _ in pairs], [d for _, d in pairs])
        return [_prediction(p, s) for p, s in zip(probs, scores_from_probs(probs))]

    def rank(self, query: str, items: Sequence[str], top_k: int | None = None) -> list[dict]:
        """Items sorted by descending score (ties keep input order), each with ``index`` and ``item``."""
        results = [{"index": i, "item": item, **pred} for i, (item, pred) in
                   enumerate(zip(items, self.predict((query, item) for item in items)))]
        results.sort(key=lambda r: -r["score"])
        return results[:top_k] if top_k is not None else results


def _prediction(probs: np.ndarray, score: float) -> dict:
    return {**{col: float(p) for col, p in zip(PROB_COLUMNS, probs)}, "score": float(score),
            "pred_label": LABELS[int(np.argmax(probs))]}
