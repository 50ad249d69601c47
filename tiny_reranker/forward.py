"""The model's forward passes for the label head: the four label logits of a batch, of a training step, of a
whole scoring set (:func:`logits_of_token_ids`, the one inference path), and the shared prompt prefix run once.

The reranker reads the hidden state at the last prompt position and projects it onto the four label-token
rows of the output embedding only (``modeling.LabelRowsHead``)::

    label_logits = last_hidden @ W[label_ids].T      # [B, 4], never [B, L, vocab]

Batches come from :mod:`tiny_reranker.batching` (pure layout, no model); this module runs them.

* **Prefix reuse**: the system turn and instruction are the same for every pair. :func:`encode_prefix`
  runs them once per batch (or once per scoring call) and every row attends to the same keys/values.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from esci_dataset import LABELS
from tiny_reranker import compat
from tiny_reranker.batching import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_BATCH_TOKENS,
    VARLEN_KEYS,
    collate_left_padded,
    length_sorted_batches,
    shared_prefix_len,
)


def label_logits(model: nn.Module, batch: dict[str, torch.Tensor], prefix_kv=None, n_outputs: int = len(LABELS)) -> torch.Tensor:
    """Label logits ``[B, 4]`` (``LABELS`` order) at the last token of each prompt (``[B, n_outputs]`` for a
    head on other answer tokens, e.g. a yes/no baseline's).

    ``model`` is a causal LM (or a peft/DDP wrapper of one) with the label head
    attached. ``batch`` is one of:

    * left-padded (``batching.collate_left_padded``): ``input_ids``, ``attention_mask``,
      ``position_ids`` ``[B, L]``; the last position is read;
    * packed, padding-free (``batching.collate_packed``): ``input_ids``, ``position_ids``
      ``[1, T]``, ``last_token_mask`` ``[1, T]`` marking each prompt's end, and the varlen
      kwargs that ``flash_attention_2`` and ``varlen.VARLEN_ATTENTION`` read.

    With ``prefix_kv`` (a :class:`PrefixKV`), a batch collated with ``skip_prefix``
    holds only what follows the shared prefix, whose keys/values are reused instead of
    recomputed. A packed one then needs one of those two attention implementations.
    Extra keys (``labels``) are ignored.
    """
    if "last_token_mask" in batch:
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
    if logits.shape[-1] != n_outputs:
        raise RuntimeError(f"expected {n_outputs} label logits, got {logits.shape[-1]}: is the label head attached?")
    return logits


def packed_forward_kwargs(batch: dict, prefix_kv: PrefixKV | None) -> dict:
    """The forward's kwargs for a ``batching.collate_packed`` row beyond ids and positions: the varlen layout, and
    for a row collated without the shared prefix, the cache that supplies it (``prefix_kv`` must be that prefix)."""
    kwargs = {k: batch[k] for k in VARLEN_KEYS if k in batch}
    if "prefix_key_index" not in batch:
        return {**kwargs, "use_cache": False}
    if prefix_kv is None or prefix_kv.length != batch["max_length_k"] - batch["max_length_q"]:
        raise ValueError("this packed batch was collated without its shared prefix: pass that prefix's prefix_kv")
    return {**kwargs, "use_cache": True, **prefix_kv.cache_kwargs(1, batch["prefix_key_index"])}


def step_logits(model: nn.Module, step: dict, prefix_ids: Sequence[int] = (), prefix_model: nn.Module | None = None
                ) -> torch.Tensor:
    """Label logits ``[B, 4]`` for a ``batching.TrainStepCollator`` step, in the step's ``labels`` order.

    ``prefix_ids``: the shared prefix the micro-batches were collated without; it
    runs once here (through ``prefix_model``, default ``model``) and its
    keys/values serve every micro-batch, gradients included.
    """
    prefix_kv = encode_prefix(prefix_model or model, prefix_ids) if len(prefix_ids) else None
    parts = [label_logits(model, mb, prefix_kv=prefix_kv) for mb in step["micro_batches"]]
    logits = torch.cat(parts) if len(parts) > 1 else parts[0]
    inverse = torch.empty_like(step["order"])
    inverse[step["order"]] = torch.arange(len(step["order"]), device=step["order"].device)
    return logits[inverse]


class PrefixKV:
    """Keys/values of a prompt prefix shared by every pair (system turn + instruction).

    Computed once with batch size 1; :meth:`cache_kwargs` hands each batch its own
    cache whose rows view the same prefix, so the prefix costs nothing per pair.
    """

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor]]):
        self.layers = layers
        self.length = layers[0][0].shape[-2]

    def cache_kwargs(self, n_rows: int, key_index: torch.Tensor | None = None) -> dict:
        """``{name: cache}`` for the model's forward (``compat.prefix_cache``).

        Each layer's keys are the prefix (viewed by all ``n_rows`` rows) followed by the
        batch's own. ``key_index`` (packed rows, ``n_rows == 1``) reorders them into the
        per-prompt ``[prefix, prompt]`` layout of ``batching.collate_packed``.
        """
        return compat.prefix_cache(self.layers, n_rows, key_index)

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
    cache = compat.output_cache(out)
    return PrefixKV([(layer.keys, layer.values) for layer in cache.layers])


@torch.inference_mode()
def logits_of_token_ids(model, token_ids: Sequence[Sequence[int]], pad_token_id: int,
                        batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = False, prefix_ids: Sequence[int] = (),
                        max_batch_tokens: int | None = DEFAULT_MAX_BATCH_TOKENS, n_outputs: int = len(LABELS)) -> np.ndarray:
    """Raw label logits ``[N, 4]`` (``LABELS`` order, float32) for encoded prompts, in input order
    (``[N, n_outputs]`` for a head on other answer tokens).

    Batches are length-sorted, token-budgeted and left-padded; results are
    scattered back to the input order, so the output never depends on batching.
    ``prefix_ids``: a prefix every prompt shares (the system turn and instruction).
    Its keys/values are computed once and reused, so each pair only runs the
    tokens after it; the numbers equal the full-prompt path (tested to 1e-5 in fp32).
    """
    logits_out = np.zeros((len(token_ids), n_outputs), dtype=np.float32)
    if not len(token_ids):
        return logits_out
    device = next(model.parameters()).device
    n_prefix = shared_prefix_len(token_ids, prefix_ids)
    prefix_kv = encode_prefix(model, prefix_ids) if n_prefix else None
    batches = length_sorted_batches([len(t) - n_prefix for t in token_ids], batch_size, max_batch_tokens)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="scoring", unit="batch")  # tqdm writes to stderr
    for idx in batches:
        batch = collate_left_padded([{"input_ids": token_ids[i][n_prefix:]} for i in idx], pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        logits_out[idx] = label_logits(model, batch, prefix_kv=prefix_kv, n_outputs=n_outputs).float().cpu().numpy()
    return logits_out
