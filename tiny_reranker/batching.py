"""How prompts become batches: every batching decision lives here.

* **Scoring** (eval, predict, the API): the rows are sorted by length and cut
  into batches bounded by rows, padded tokens and padding share
  (:func:`length_sorted_batches`). Results are scattered back to input order,
  so the numbers never depend on the batching.
* **Training**: *which* pairs share an optimizer step is never chosen by
  length. The Trainer's random sampler draws each step's batch; inside that
  step :class:`TrainStepCollator` sorts it by length and cuts it into at most a
  few micro-batches (:func:`plan_micro_batches`), or packs it padding-free under
  flash-attention. ``forward.step_logits`` runs the micro-batches and returns the
  logits in the batch's own order, so the loss is one mean over the step's pairs
  and its gradient equals the plain padded full-batch gradient (tested).
  Length-grouped *sampling* is the opposite trade: it skews each step's label mix
  and can collapse training to the majority class.
* **Prefix reuse**: ``skip_prefix`` leaves the shared system turn and instruction out
  of the rows; ``forward.encode_prefix`` supplies their keys/values.

Pure layout: lists of token ids in, index arrays and tensors out. Nothing here runs a model
(that is :mod:`tiny_reranker.forward`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

# ---------------------------------------------------------------------------
# Scoring batches
# ---------------------------------------------------------------------------
DEFAULT_BATCH_SIZE = 64          # most pairs in one forward pass
DEFAULT_MAX_BATCH_TOKENS = 16384  # most (padded) tokens in one forward pass: bounds memory on long items
DEFAULT_MAX_PADDING = 0.1         # a batch's rows are within 10% of its longest: padding is < 10% of the work


def length_sorted_batches(lengths: Sequence[int], batch_size: int = DEFAULT_BATCH_SIZE,
                          max_batch_tokens: int | None = DEFAULT_MAX_BATCH_TOKENS,
                          max_padding: float = DEFAULT_MAX_PADDING) -> list[np.ndarray]:
    """Indices in batches of similar length, longest first (so an OOM shows up at once). Scoring only.

    A batch holds at most ``batch_size`` rows, at most ``max_batch_tokens`` tokens once
    padded to its longest row (a single longer row still gets a batch), and only rows
    at least ``(1 - max_padding)`` as long as its longest, so padding stays under
    ``max_padding`` of the work even on a small or unevenly spread set.
    """
    if batch_size < 1 or (max_batch_tokens is not None and max_batch_tokens < 1):
        raise ValueError(f"batch_size ({batch_size}) and max_batch_tokens ({max_batch_tokens}) must be positive")
    lengths = np.asarray(lengths)
    order = np.argsort(-lengths, kind="stable")
    batches, start = [], 0
    while start < len(order):
        longest = max(1, int(lengths[order[start]]))
        rows = batch_size if max_batch_tokens is None else max(1, min(batch_size, max_batch_tokens // longest))
        stop = min(start + rows, len(order))
        # Sorted descending, so the rows long enough to join form a prefix of order[start:stop].
        too_short = np.flatnonzero(lengths[order[start:stop]] < longest * (1.0 - max_padding))
        stop = start + (int(too_short[0]) if len(too_short) and too_short[0] > 0 else stop - start)
        batches.append(order[start:stop])
        start = stop
    return batches


def shared_prefix_len(token_ids: Sequence[Sequence[int]], candidate: Sequence[int]) -> int:
    """``len(candidate)`` if every sequence starts with it and is longer, else 0."""
    n = len(candidate)
    candidate = list(candidate)
    if n == 0 or not all(len(t) > n and list(t[:n]) == candidate for t in token_ids):
        return 0
    return n


# ---------------------------------------------------------------------------
# Collators
# ---------------------------------------------------------------------------
def collate_left_padded(features: list[dict], pad_token_id: int, skip_prefix: int = 0) -> dict[str, torch.Tensor]:
    """Left-pad a list of ``{"input_ids", ["labels"]}`` into a batch.

    Left padding puts every prompt's last token at position -1, where the head
    reads. ``position_ids`` count real tokens only, so a pair's result does not
    depend on how much padding its batch needed. ``skip_prefix`` drops that many
    leading tokens (a shared prefix whose keys/values are supplied separately).
    """
    rows = [f["input_ids"][skip_prefix:] for f in features]
    longest = max(len(r) for r in rows)
    ids = torch.full((len(features), longest), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(features), longest), dtype=torch.long)
    for row, r in enumerate(rows):
        n = len(r)
        ids[row, longest - n:] = torch.as_tensor(r, dtype=torch.long)
        mask[row, longest - n:] = 1
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
    }
    if "labels" in features[0]:
        batch["labels"] = torch.tensor([int(f["labels"]) for f in features], dtype=torch.long)
    return batch


def collate_packed(features: list[dict], skip_prefix: int = 0) -> dict[str, torch.Tensor]:
    """Pack a list of prompts into one padding-free row ``[1, T]``.

    ``last_token_mask`` marks where each prompt's answer is read. The row carries
    its layout as flash-attention varlen kwargs, read by ``flash_attention_2`` and
    by ``varlen.VARLEN_ATTENTION``, so each prompt attends to itself only:

    * ``cu_seq_lens_q`` / ``max_length_q``: each prompt's span in the packed row;
    * ``cu_seq_lens_k`` / ``max_length_k``: each prompt's keys.

    Without a shared prefix the two are the same and ``position_ids`` restart at 0
    for each prompt (from which sdpa builds a block-diagonal mask). ``skip_prefix``
    drops that many leading tokens, the shared prefix whose keys/values
    ``forward.PrefixKV`` supplies once: positions then start after the prefix, each
    prompt's keys are the prefix followed by its own tokens (its causal mask aligned
    bottom-right), and ``prefix_key_index`` says where those keys sit in the
    ``[prefix, packed row]`` the cache layer sees (``forward.PrefixKV.cache_kwargs``).
    """
    ids, positions, last, lengths = [], [], [], []
    for f in features:
        row = f["input_ids"][skip_prefix:]
        n = len(row)
        ids.extend(row)
        positions.extend(range(skip_prefix, skip_prefix + n))
        last.extend([False] * (n - 1) + [True])
        lengths.append(n)
    batch = {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "last_token_mask": torch.tensor([last], dtype=torch.bool),
        **_varlen_layout(lengths, skip_prefix),
    }
    if "labels" in features[0]:
        batch["labels"] = torch.tensor([int(f["labels"]) for f in features], dtype=torch.long)
    return batch


VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")  # what the attention kernels read


def _varlen_layout(lengths: Sequence[int], prefix_len: int) -> dict:
    """Varlen kwargs for packed prompts of ``lengths`` that each attend to a shared ``prefix_len``-token prefix
    (none if 0). With a prefix, ``prefix_key_index`` picks each prompt's ``[prefix, prompt]`` keys from the
    concatenation ``[prefix (prefix_len), packed row (sum(lengths))]``."""
    lengths = np.asarray(lengths, dtype=np.int64)
    cu_q = np.concatenate([[0], np.cumsum(lengths)])
    layout = {
        "cu_seq_lens_q": torch.as_tensor(cu_q, dtype=torch.int32),
        "cu_seq_lens_k": torch.as_tensor(np.concatenate([[0], np.cumsum(lengths + prefix_len)]), dtype=torch.int32),
        "max_length_q": int(lengths.max()),
        "max_length_k": int(lengths.max()) + prefix_len,
    }
    if prefix_len:
        layout["prefix_key_index"] = torch.as_tensor(np.concatenate(
            [np.concatenate([np.arange(prefix_len), prefix_len + start + np.arange(n)])
             for start, n in zip(cu_q[:-1], lengths)]), dtype=torch.long)
    return layout


# ---------------------------------------------------------------------------
# Training steps: a random batch, cut into length-sorted micro-batches
# ---------------------------------------------------------------------------
DEFAULT_MAX_MICRO_BATCHES = 4  # enough to remove most padding of a random batch; few enough to keep GPU batches wide
MIN_MICRO_BATCH_SAVING = 0.05  # one more micro-batch must save >= 5% of the step's real tokens in padding


def _best_partition_cost(sorted_lengths: np.ndarray, max_groups: int) -> tuple[list[float], list[list[int]]]:
    """For k = 1..max_groups: the least padded-token cost of cutting ascending lengths into k
    contiguous groups (a group costs rows x its longest), and where the groups start."""
    n = len(sorted_lengths)
    longest = sorted_lengths.astype(np.float64)
    cost = np.full((max_groups + 1, n + 1), np.inf)  # cost[k, j]: the first j rows in k groups
    cut = np.zeros((max_groups + 1, n + 1), dtype=np.int64)
    cost[0, 0] = 0.0
    for k in range(1, max_groups + 1):
        for j in range(k, n + 1):
            starts = np.arange(k - 1, j)  # the last group is rows i..j-1
            candidates = cost[k - 1, k - 1:j] + (j - starts) * longest[j - 1]
            best = int(np.argmin(candidates))
            cost[k, j], cut[k, j] = candidates[best], starts[best]
    totals, group_starts = [], []
    for k in range(1, max_groups + 1):
        bounds, j = [], n
        for kk in range(k, 0, -1):
            j = int(cut[kk, j])
            bounds.append(j)
        totals.append(float(cost[k, n]))
        group_starts.append(sorted(bounds))
    return totals, group_starts


def plan_micro_batches(lengths: Sequence[int], max_micro_batches: int = DEFAULT_MAX_MICRO_BATCHES,
                       min_saving: float = MIN_MICRO_BATCH_SAVING) -> list[np.ndarray]:
    """Cut one step's rows into length-sorted micro-batches that waste the least padding.

    Returns index arrays into ``lengths`` (each row exactly once). The rows of a
    step are fixed by the sampler; this only decides how they are laid out, so the
    step's loss and gradient do not change. A further cut is taken only when it
    saves at least ``min_saving`` of the step's real tokens, since every
    micro-batch is one more (narrower) forward pass.
    """
    lengths = np.asarray(lengths)
    if len(lengths) == 0:
        return []
    order = np.argsort(lengths, kind="stable")
    max_groups = max(1, min(int(max_micro_batches), len(lengths)))
    totals, starts = _best_partition_cost(lengths[order], max_groups)
    chosen = 0
    for k in range(1, max_groups):
        if totals[k] < totals[chosen] - min_saving * float(lengths.sum()):
            chosen = k
    bounds = starts[chosen] + [len(lengths)]
    return [order[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


class TrainStepCollator:
    """Collate one optimizer step's (randomly drawn) features.

    Returns ``{"micro_batches": [batch, ...], "order": LongTensor [B], "labels": LongTensor [B]}``:
    ``labels`` in the sampler's order, each micro-batch left-padded (or one packed
    row under flash-attention), and ``order`` the sampler positions of the rows as
    the micro-batches hold them, so ``forward.step_logits`` can put them back.
    ``skip_prefix`` drops the shared prefix, whose keys/values are reused.
    """

    def __init__(self, pad_token_id: int, skip_prefix: int = 0, max_micro_batches: int = DEFAULT_MAX_MICRO_BATCHES,
                 packed: bool = False):
        self.pad_token_id, self.skip_prefix = pad_token_id, skip_prefix
        self.max_micro_batches, self.packed = max_micro_batches, packed

    def __call__(self, features: list[dict]) -> dict:
        labels = torch.tensor([int(f["labels"]) for f in features], dtype=torch.long)
        if self.packed:
            groups = [np.arange(len(features))]
        else:
            groups = plan_micro_batches([len(f["input_ids"]) - self.skip_prefix for f in features], self.max_micro_batches)
        micro_batches = []
        for idx in groups:
            rows = [{"input_ids": features[i]["input_ids"]} for i in idx]
            micro_batches.append(collate_packed(rows, self.skip_prefix) if self.packed
                                 else collate_left_padded(rows, self.pad_token_id, self.skip_prefix))
        order = torch.as_tensor(np.concatenate(groups), dtype=torch.long)
        return {"micro_batches": micro_batches, "order": order, "labels": labels}
