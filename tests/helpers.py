"""Small helpers several test files share (not part of the library: no script or user calls them)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from tiny_reranker.batching import DEFAULT_BATCH_SIZE, DEFAULT_MAX_BATCH_TOKENS
from tiny_reranker.forward import logits_of_token_ids
from tiny_reranker.scoring import probs_from_logits


def score_token_ids(model, token_ids: Sequence[Sequence[int]], pad_token_id: int, batch_size: int = DEFAULT_BATCH_SIZE,
                    progress: bool = False, prefix_ids: Sequence[int] = (),
                    max_batch_tokens: int | None = DEFAULT_MAX_BATCH_TOKENS, temperature: float = 1.0) -> np.ndarray:
    """Label probabilities ``[N, 4]`` for encoded prompts, in input order: ``softmax(logits / temperature)`` of
    the library's one inference path, ``forward.logits_of_token_ids``."""
    logits = logits_of_token_ids(model, token_ids, pad_token_id, batch_size, progress, prefix_ids, max_batch_tokens)
    return probs_from_logits(logits, temperature)
