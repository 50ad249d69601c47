"""The Python API, and the one inference path: :class:`Reranker` scores (query, item_text) pairs.

``eval.py``, ``predict.py`` and the API all end in ``forward.logits_of_token_ids`` and
``scoring.probs_from_logits``, so the same pair gets the same numbers wherever it is
scored: prompts built by ``esci_dataset.PromptEncoder``, left-padded, length-sorted
batches, softmax over the four label logits divided by the calibration temperature
stored with the model (``reranker_config.json``; 1, i.e. the raw logits, when there
is none or with ``--no_temperature``).
"""

from __future__ import annotations

import logging
import numbers
from typing import Iterable, Sequence

import numpy as np
import torch

from esci_dataset import DEFAULT_TEMPLATE, PromptEncoder, PromptTemplate
from tiny_reranker.batching import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_BATCH_TOKENS,
)
from tiny_reranker.contract import check_temperature, stored_temperature, stored_template
from tiny_reranker.forward import logits_of_token_ids
from tiny_reranker.model_files import check_model_paths
from tiny_reranker.modeling import load_reranker, reranker_tokenizer, resolve_dtype
from tiny_reranker.scoring import check_rank_by, prediction_records, probs_from_logits, rank_results

logger = logging.getLogger(__name__)
ENCODE_BATCH = 512  # pairs per tokenizer call: enough for its threads, a few MB of temporary encodings


def _check_texts(values: Sequence, what: str) -> None:
    if isinstance(values, str):  # a str is a sequence of characters: it would score one pair per character
        raise TypeError(f"{what} must be a list of strings, not one string")
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise TypeError(f"{what}[{i}] must be a str, got {type(v).__name__}: {v!r}")


class Reranker:
    """Score (query, item_text) pairs with the 4-class reranker.

    >>> rr = Reranker.from_pretrained("Qwen/Qwen3-0.6B", lora_model="outputs/lora")
    >>> rr.rank("usb c charger", ["Anker 65W USB-C charger", "HDMI cable"])[0]["item"]

    Edge cases, by design:

    * **No pairs / no items**: ``predict([])`` and ``rank(q, [])`` return ``[]``
      without touching the model.
    * **Empty strings** (``""`` or blanks) are scored as given: the prompt holds an
      empty ``<Query>:`` / ``<Document>:`` slot. Nothing is dropped, so outputs stay
      aligned with inputs. (``predict.py`` is stricter and rejects blank cells,
      which in a file are almost always a data bug.) Non-``str`` values raise TypeError.
    * **Long texts** are truncated to ``max_length`` prompt tokens exactly as in
      training: the item text is cut first, then the query if it alone does not
      fit; the template and the answer suffix are always kept whole. A long
      item therefore scores as its first tokens; nothing errors.
    * **Temperature**: ``self.temperature`` (from ``reranker_config.json`` when loaded with
      :meth:`from_pretrained`; 1 = raw) divides the label logits before the softmax. It never
      changes ``pred_label`` but can change the order of items by ``score``.
    """

    def __init__(self, model, tokenizer, max_length: int = 512, batch_size: int = DEFAULT_BATCH_SIZE,
                 max_batch_tokens: int | None = DEFAULT_MAX_BATCH_TOKENS, reuse_prefix: bool = True,
                 template: PromptTemplate = DEFAULT_TEMPLATE, temperature: float = 1.0):
        self.model, self.tokenizer = model, tokenizer
        self.temperature = check_temperature(temperature)  # label logits are divided by it; 1 = raw
        self.encoder = PromptEncoder(tokenizer, max_length, template)
        self.batch_size, self.max_batch_tokens = batch_size, max_batch_tokens
        # The system turn + instruction is the same for every pair: encode it once.
        self.prefix_ids = self.encoder.head_ids if reuse_prefix else []

    @classmethod
    def from_pretrained(cls, base_model: str, lora_model: str | None = None, device: torch.device | str | None = None,
                        dtype: torch.dtype | str | None = None, max_length: int = 512,
                        batch_size: int = DEFAULT_BATCH_SIZE, max_batch_tokens: int | None = DEFAULT_MAX_BATCH_TOKENS,
                        no_flash_attn: bool = False, temperature: float | None = None) -> "Reranker":
        """Load ``base_model`` (+ the LoRA folder ``lora_model``, or a merged export alone).

        ``device``: default cuda when available, else cpu. ``dtype``: a torch dtype, ``"fp32"``,
        ``"bf16"`` or ``"auto"``/None (bf16 on CUDA and on CPUs with native bf16, else fp32; the
        same rule as ``eval.py``). ``batch_size`` / ``max_batch_tokens``: the most pairs / padded
        tokens per forward pass. ``temperature``: None applies the one stored with the model
        (train.py fits one by default; 1 when there is none); 1.0 scores the raw logits.
        Missing folders raise :class:`ESCIDataError`.
        """
        check_model_paths(base_model, lora_model)
        template, tokenizer = stored_template(base_model, lora_model), reranker_tokenizer(base_model, lora_model)
        # max_length too small for the stored template: say so before the (slow) model load
        PromptEncoder(tokenizer, max_length, template)
        if temperature is None:
            temperature = stored_temperature(base_model, lora_model) or 1.0
            if temperature != 1.0:
                logger.info("applying the stored temperature %.4f: label logits / T before the softmax "
                            "(temperature=1.0, or --no_temperature, scores the raw logits)", temperature)
        model, tokenizer = load_reranker(base_model, lora_model, resolve_dtype(dtype), no_flash_attn, device, tokenizer)
        return cls(model, tokenizer, max_length, batch_size, max_batch_tokens,
                   template=template, temperature=temperature)

    def encode(self, queries: Sequence[str], items: Sequence[str]) -> list[list[int]]:
        """Prompt token ids, exactly as ``ESCIMultiClassRerankDataset`` builds them (truncation included)."""
        return self.encoder.encode_batch(list(queries), list(items))

    def predict_probs(self, queries: Sequence[str], items: Sequence[str], progress: bool = False) -> np.ndarray:
        """``[N, 4]`` float64 probabilities (``LABELS`` order) for aligned query/item lists, in input order:
        ``softmax(logits / self.temperature)``."""
        return probs_from_logits(self.predict_logits(queries, items, progress), self.temperature)

    def predict_logits(self, queries: Sequence[str], items: Sequence[str], progress: bool = False) -> np.ndarray:
        """``[N, 4]`` float32 raw label logits (no temperature), in input order."""
        if len(queries) != len(items):
            raise ValueError(f"got {len(queries)} queries but {len(items)} items; they must be aligned")
        _check_texts(queries, "queries")
        _check_texts(items, "items")
        token_ids = []
        # Tokenizer calls of ENCODE_BATCH pairs: a call holds every pair's full encoding (tokens, offsets: ~25 KB a
        # 2 KB item) until it returns. Kept as int32 arrays, not lists of Python ints: ~0.5 KB a 128-token prompt
        # instead of ~4.6 KB.
        for start in range(0, len(queries), ENCODE_BATCH):
            token_ids += [np.asarray(ids, dtype=np.int32) for ids in self.encode(queries[start:start + ENCODE_BATCH],
                                                                                 items[start:start + ENCODE_BATCH])]
        head = self.model.get_output_embeddings()  # 4 label rows; 2 (no, yes) for baselines.qwen3_reranker_p_yes
        return logits_of_token_ids(self.model, token_ids, self.tokenizer.pad_token_id, self.batch_size, progress,
                                   self.prefix_ids, self.max_batch_tokens, n_outputs=len(head.label_ids))

    def predict(self, pairs: Iterable[tuple[str, str]], progress: bool = False, rank_by: str = "score") -> list[dict]:
        """Per pair ``(query, item_text)``: ``{p_E, p_S, p_C, p_I, score, pred_label}``, in input order.

        ``score = (3·p_E + 2·p_S + p_C) / 3`` in [0, 1]; ``pred_label`` is the argmax class.
        ``rank_by="expected_gain"`` adds ``expected_gain = p_E + 0.1·p_S + 0.01·p_C`` (ESCI's nDCG gains).
        """
        check_rank_by(rank_by)
        pairs = list(pairs)
        for i, pair in enumerate(pairs):
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                raise TypeError(f"pairs[{i}] must be a (query, item_text) pair, got {pair!r}")
        probs = self.predict_probs([q for q, _ in pairs], [d for _, d in pairs], progress)
        return prediction_records(probs, rank_by)

    def rank(self, query: str, items: Sequence[str], top_k: int | None = None, rank_by: str = "score") -> list[dict]:
        """``items`` sorted by descending ``rank_by`` (ties keep input order); the first ``top_k`` (all if None).

        Each result: ``{index, item, p_E, p_S, p_C, p_I, score, pred_label}``, where
        ``index`` is the item's position in ``items``. ``rank_by``: ``"score"`` (the default,
        ``(3·p_E + 2·p_S + p_C) / 3``) or ``"expected_gain"`` (``p_E + 0.1·p_S + 0.01·p_C``, ESCI's
        nDCG gains; the result then also holds ``expected_gain``).
        """
        check_rank_by(rank_by)
        if not isinstance(query, str):
            raise TypeError(f"query must be a str, got {type(query).__name__}: {query!r}")
        if isinstance(items, str):
            raise TypeError("items must be a list of strings, not one string")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral)):
            raise TypeError(f"top_k must be an int or None, got {type(top_k).__name__}: {top_k!r}")
        if top_k is not None and top_k < 0:
            raise ValueError(f"top_k must be >= 0 or None, got {top_k}")
        items = list(items)
        return rank_results(items, prediction_records(self.predict_probs([query] * len(items), items), rank_by), top_k,
                            rank_by)
