"""Scoring with a trained (or zero-shot) reranker: the one inference path.

``eval.py``, ``predict.py`` and the :class:`Reranker` API all end in
:func:`score_token_ids`, so the same pair gets the same numbers wherever it is
scored: prompts built by ``esci_dataset.PromptEncoder``, left-padded,
length-sorted batches, softmax over the four label logits divided by the
calibration temperature stored with the model (``reranker_config.json``;
1, i.e. the raw logits, when there is none or with ``--no_temperature``).
"""

from __future__ import annotations

import logging
import os
from typing import Iterable, Sequence

import numpy as np
import torch

from batching import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_BATCH_TOKENS,
    collate_left_padded,
    encode_prefix,
    length_sorted_batches,
    shared_prefix_len,
)
from esci_dataset import DEFAULT_TEMPLATE, LABELS, ESCIDataError, PromptEncoder, PromptTemplate, label_token_ids
from modeling import (
    LABEL_CONFIG_NAME,
    attach_label_head,
    check_hub_reachable,
    check_reranker_config,
    check_safetensors_only,
    label_logits,
    load_base_model,
    load_tokenizer,
    non_finite_names,
    read_json_object,
    read_reranker_config,
    resolve_dtype,
    scores_from_probs,
    temperature_from_config,
    template_from_config,
)

logger = logging.getLogger(__name__)

PROB_COLUMNS = tuple(f"p_{label}" for label in LABELS)
OUTPUT_COLUMNS = (*PROB_COLUMNS, "score", "pred_label")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_model_paths(base_model: str, lora_model: str | None = None) -> None:
    """Fail early, with :class:`ESCIDataError`, on a missing, pickle-only or unreachable model.

    ``base_model`` may be a hub id (``org/name``); strings that can only be local
    paths (absolute, ``./``, ``../``, ``~``, or more than one ``/``) must exist, and
    a hub id that is not cached must be reachable. Only safetensors weights load.
    """
    if lora_model is not None:
        if not os.path.isdir(lora_model):
            raise ESCIDataError(f"lora_model {lora_model}: folder not found")
        if not os.path.isfile(os.path.join(lora_model, "adapter_config.json")):
            raise ESCIDataError(f"lora_model {lora_model}: no adapter_config.json, so not a LoRA adapter folder "
                                "(train.py writes one into its --output_dir)")
        check_safetensors_only(lora_model, "lora_model")
        check_adapter_config(lora_model)
        check_safetensors_readable(os.path.join(lora_model, "adapter_model.safetensors"))
    local_only = base_model.startswith(("/", "./", "../", "~")) or base_model.count("/") > 1
    if local_only and not os.path.isdir(os.path.expanduser(base_model)):
        raise ESCIDataError(f"base_model {base_model}: folder not found")
    check_safetensors_only(os.path.expanduser(base_model), "base_model")
    check_base_model_kind(os.path.expanduser(base_model))
    check_hub_reachable(base_model, "base_model")


def check_base_model_kind(folder: str) -> None:
    """Refuse, as the base model, a LoRA adapter folder or a sequence classifier (``export.py --format seq_cls``).

    transformers loads either without complaint: an adapter through its peft integration (training would then
    stack a second LoRA on it and save a broken adapter), a classifier as a causal LM without its ``score``
    head, and with it the temperature folded into that head. Runs would succeed with other probabilities.
    """
    adapter_config = os.path.join(folder, "adapter_config.json")
    if os.path.isfile(adapter_config):
        trained_on = (read_reranker_config(folder) or {}).get("base_model")
        hint = f" (this one was trained on {trained_on})" if trained_on else ""
        raise ESCIDataError(
            f"base_model {folder}: a LoRA adapter folder (it holds adapter_config.json), not a base model. Pass it as "
            f"--lora_model, with the model it was trained on as --base_model{hint}; export.py --format merged turns "
            f"the two into one folder that works as a base model.")
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        return
    classifiers = [a for a in read_json_object(config_path).get("architectures") or []
                   if str(a).endswith("ForSequenceClassification")]
    if classifiers:
        raise ESCIDataError(
            f"base_model {folder}: a sequence classifier ({classifiers[0]}, as export.py --format seq_cls writes for "
            f"serving engines). Scoring here reads the causal LM's label-word logits, which would drop its score head "
            f"and the temperature folded into it. Pass the adapter (--lora_model) with its base model, or an "
            f"export.py --format merged folder.")


def check_safetensors_readable(path: str) -> None:
    """A truncated or corrupt weights file is a user error naming it, not a traceback from the loader."""
    if not os.path.isfile(path):
        return
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                f.get_slice(name)
    except Exception as exc:  # safetensors raises its own error type for every kind of damage
        raise ESCIDataError(f"{path}: unreadable safetensors file ({str(exc).splitlines()[0]}); "
                            "it may be truncated: copy it again or re-run the export/training") from None


def check_adapter_config(lora_model: str) -> None:
    """An empty or corrupt ``adapter_config.json`` is a user error, not a traceback from peft."""
    read_json_object(os.path.join(lora_model, "adapter_config.json"))


def reranker_tokenizer(base_model: str, lora_model: str | None = None):
    """The adapter folder's tokenizer when it holds one (the one training used), else the base model's."""
    base_model = os.path.expanduser(base_model)
    lora_model = os.path.expanduser(lora_model) if lora_model else None
    has_tokenizer = lora_model and os.path.exists(os.path.join(lora_model, "tokenizer_config.json"))
    return load_tokenizer(lora_model if has_tokenizer else base_model)


def load_reranker(base_model: str, lora_model: str | None = None, dtype: torch.dtype = torch.float32,
                  no_flash_attn: bool = False, device: torch.device | str | None = None, tokenizer=None):
    """Base model (+ LoRA adapter) with the 4-row label head, in eval mode. Returns ``(model, tokenizer)``.

    The tokenizer (``tokenizer``, else loaded) comes from the adapter folder when it holds one (it is the
    one training used), else from the base model. A ``reranker_config.json``
    (next to the adapter, or in a merged export) is checked for prompt drift.
    """
    base_model = os.path.expanduser(base_model)
    lora_model = os.path.expanduser(lora_model) if lora_model else None
    tokenizer = tokenizer or reranker_tokenizer(base_model, lora_model)
    model = load_base_model(base_model, dtype=dtype, no_flash_attn=no_flash_attn)
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
    elif os.path.isfile(os.path.join(base_model, LABEL_CONFIG_NAME)):
        check_reranker_config(base_model, tokenizer)  # a merged export (export.py --format merged)
    attach_label_head(model.get_base_model() if lora_model else model, label_token_ids(tokenizer))
    model.to(device or default_device()).eval()
    return model, tokenizer


def stored_template(base_model: str, lora_model: str | None = None) -> PromptTemplate:
    """The prompt the adapter (or a merged export) was trained with, from its ``reranker_config.json``.

    An adapter that stores no template gets its prompt version's template; a
    folder without the file gets today's default.
    """
    folder = os.path.expanduser(lora_model or base_model)
    saved = read_reranker_config(folder) if os.path.isdir(folder) else None
    return template_from_config(saved, os.path.join(folder, LABEL_CONFIG_NAME))


def stored_temperature(base_model: str, lora_model: str | None = None) -> float | None:
    """The calibration temperature in the adapter's (or a merged export's) ``reranker_config.json``, or None."""
    folder = os.path.expanduser(lora_model or base_model)
    saved = read_reranker_config(folder) if os.path.isdir(folder) else None
    return temperature_from_config(saved, os.path.join(folder, LABEL_CONFIG_NAME))


def check_temperature(temperature: float) -> float:
    """``temperature`` as a float; a ValueError unless it is positive and finite."""
    if not 0 < float(temperature) < float("inf"):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    return float(temperature)


_SHOW_BAD_ROWS = 5  # rows named in the non-finite-logits error


def probs_from_logits(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``softmax(logits / temperature)`` over the last axis, in float64. ``logits: [N, 4]`` -> ``[N, 4]``.

    Every scoring path ends here, so a temperature is applied the same way everywhere, and
    non-finite logits are refused here (ESCIDataError): their probabilities would be NaN, and the
    label and rank taken from them arbitrary.
    """
    logits = np.asarray(logits)
    bad = np.flatnonzero(~np.isfinite(logits).all(axis=-1))
    if len(bad):
        rows = ", ".join(map(str, bad[:_SHOW_BAD_ROWS].tolist())) + (", ..." if len(bad) > _SHOW_BAD_ROWS else "")
        raise ESCIDataError(
            f"the model gave non-finite label logits (NaN or inf) for {len(bad)} of {len(logits)} pairs "
            f"(0-based input rows {rows}); no scores were produced. Its weights hold NaN or inf (e.g. an adapter "
            f"saved after training diverged), or the dtype overflowed: check the adapter, or try --dtype fp32.")
    return torch.softmax(torch.as_tensor(logits, dtype=torch.float64) / temperature, dim=-1).numpy()


def score_token_ids(model, token_ids: Sequence[Sequence[int]], pad_token_id: int, batch_size: int = DEFAULT_BATCH_SIZE,
                    progress: bool = False, prefix_ids: Sequence[int] = (),
                    max_batch_tokens: int | None = DEFAULT_MAX_BATCH_TOKENS, temperature: float = 1.0) -> np.ndarray:
    """Label probabilities ``[N, 4]`` (``LABELS`` order, float64) for encoded prompts, in input order:
    ``softmax(logits / temperature)`` of :func:`logits_of_token_ids`."""
    logits = logits_of_token_ids(model, token_ids, pad_token_id, batch_size, progress, prefix_ids, max_batch_tokens)
    return probs_from_logits(logits, temperature)


@torch.inference_mode()
def logits_of_token_ids(model, token_ids: Sequence[Sequence[int]], pad_token_id: int,
                        batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = False, prefix_ids: Sequence[int] = (),
                        max_batch_tokens: int | None = DEFAULT_MAX_BATCH_TOKENS) -> np.ndarray:
    """Raw label logits ``[N, 4]`` (``LABELS`` order, float32) for encoded prompts, in input order.

    Batches are length-sorted, token-budgeted and left-padded; results are
    scattered back to the input order, so the output never depends on batching.
    ``prefix_ids``: a prefix every prompt shares (the system turn and instruction).
    Its keys/values are computed once and reused, so each pair only runs the
    tokens after it; the numbers equal the full-prompt path (tested to 1e-5 in fp32).
    """
    logits_out = np.zeros((len(token_ids), len(LABELS)), dtype=np.float32)
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
        logits_out[idx] = label_logits(model, batch, prefix_kv=prefix_kv).float().cpu().numpy()
    return logits_out


def prediction_columns(probs: np.ndarray) -> dict[str, np.ndarray]:
    """``probs [N, 4]`` -> columns ``p_E, p_S, p_C, p_I, score, pred_label`` (the predict.py output contract)."""
    probs = np.asarray(probs, dtype=np.float64).reshape(-1, len(LABELS))
    columns = {col: probs[:, j] for j, col in enumerate(PROB_COLUMNS)}
    columns["score"] = scores_from_probs(probs)
    columns["pred_label"] = np.asarray(LABELS, dtype=object)[probs.argmax(axis=1)]
    return columns


def _check_texts(values: Sequence, what: str) -> None:
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
        (``train.py --calibrate``; 1 when there is none); 1.0 scores the raw logits.
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
        for start in range(0, len(queries), 4096):  # bounded tokenizer calls for very large inputs
            token_ids += self.encode(queries[start:start + 4096], items[start:start + 4096])
        return logits_of_token_ids(self.model, token_ids, self.tokenizer.pad_token_id, self.batch_size, progress,
                                   self.prefix_ids, self.max_batch_tokens)

    def predict(self, pairs: Iterable[tuple[str, str]], progress: bool = False) -> list[dict]:
        """Per pair ``(query, item_text)``: ``{p_E, p_S, p_C, p_I, score, pred_label}``, in input order.

        ``score = (3·p_E + 2·p_S + p_C) / 3`` in [0, 1]; ``pred_label`` is the argmax class.
        """
        pairs = list(pairs)
        for i, pair in enumerate(pairs):
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                raise TypeError(f"pairs[{i}] must be a (query, item_text) pair, got {pair!r}")
        probs = self.predict_probs([q for q, _ in pairs], [d for _, d in pairs], progress)
        return prediction_records(probs)

    def rank(self, query: str, items: Sequence[str], top_k: int | None = None) -> list[dict]:
        """``items`` sorted by descending score (ties keep input order); the first ``top_k`` (all if None).

        Each result: ``{index, item, p_E, p_S, p_C, p_I, score, pred_label}``, where
        ``index`` is the item's position in ``items``.
        """
        if isinstance(items, str):
            raise TypeError("items must be a list of strings, not one string")
        if top_k is not None and top_k < 0:
            raise ValueError(f"top_k must be >= 0 or None, got {top_k}")
        items = list(items)
        return rank_results(items, prediction_records(self.predict_probs([query] * len(items), items)), top_k)


def prediction_records(probs: np.ndarray) -> list[dict]:
    """``probs [N, 4]`` -> N dicts ``{p_E, p_S, p_C, p_I, score, pred_label}`` of plain Python types."""
    columns = prediction_columns(probs)
    return [{name: (str(values[i]) if name == "pred_label" else float(values[i])) for name, values in columns.items()}
            for i in range(len(probs))]


def rank_results(items: Sequence[str], preds: Sequence[dict], top_k: int | None = None) -> list[dict]:
    """``[{index, item, **pred}]`` by descending score; ties keep input order (stable sort)."""
    results = [{"index": i, "item": item, **pred} for i, (item, pred) in enumerate(zip(items, preds))]
    results.sort(key=lambda r: -r["score"])
    return results[:top_k] if top_k is not None else results
