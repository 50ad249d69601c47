"""The ESCI data contract and the reranker prompt, defined once.

Everything that decides what the model sees lives here: label order, label
words, label token ids, the system prompt, the instruction, the prompt
template, truncation and parquet validation. ``train.py``, ``eval.py`` and
every later tool import these names and never copy a template string.

Prompt (Qwen3-Reranker style; the model's answer is the next token)::

    <|im_start|>system
    {SYSTEM_PROMPT}<|im_end|>
    <|im_start|>user
    <Instruct>: {instruction}   (INSTRUCT unless train.py --instruction)
    <Query>: {query}
    <Document>: {item_text}<|im_end|>
    <|im_start|>assistant
    <think>

    </think>

    {answer}
"""

from __future__ import annotations

import csv
import json
import os
import weakref
from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from torch.utils.data import Dataset

# ---------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------
LABELS = ("E", "S", "C", "I")  # this order everywhere: logits, probs, reports
LABEL_TEXT = {"E": "exact", "S": "substitute", "C": "complement", "I": "irrelevant"}
LABEL_TO_ID = {label: i for i, label in enumerate(LABELS)}
# Weights of the ranking score (3·P(E) + 2·P(S) + 1·P(C)) / 3 (tiny_reranker.scoring.scores_from_probs): the
# default ranking, the expected gain under linear grades 3/2/1/0.
SCORE_WEIGHTS = {"E": 3.0, "S": 2.0, "C": 1.0, "I": 0.0}
# ESCI's nDCG gains (Amazon's Shopping Queries paper): exact 1.0, substitute 0.1, complement 0.01. They grade
# relevance for evaluation, and P(E) + 0.1·P(S) + 0.01·P(C) (scoring.expected_gains) is the ranking that
# maximises the expected nDCG under them when the probabilities are calibrated.
NDCG_GAINS = {"E": 1.0, "S": 0.1, "C": 0.01, "I": 0.0}
RANK_BY = ("score", "expected_gain")  # what items can be ranked by; "score" is the default

# Bump whenever the default prompt text or a label-word rule changes. Adapters store the
# template they were trained with (reranker_config.json), so a new default never breaks them.
PROMPT_VERSION = "esci-4way-v3"

# ---------------------------------------------------------------------------
# Prompt
# ---------------------------------------------------------------------------
# Short on purpose: the template is paid for on every pair that cannot reuse the prefix
# (packed training, serving engines without prefix caching). 60 Qwen3 tokens in all.
SYSTEM_PROMPT = 'Judge the Document for the Query. Answer "exact", "substitute", "complement" or "irrelevant".'
INSTRUCT = "Given a shopping query, classify the product"
CHAT_HEAD = "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n"
# The assistant turn is opened with an empty think block, exactly as Qwen3-Reranker does.
CHAT_TAIL = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def format_instruction(instruction: str, query: str, doc: str) -> str:
    """The user turn's body. The only place the Instruct/Query/Document template exists."""
    return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}"


@dataclass(frozen=True)
class PromptTemplate:
    """A prompt around its two slots: ``head + " " + query + middle + " " + doc + tail``.

    The space before each slot belongs to the slot: BPE tokenizers attach a leading
    space to the next word, so ``tok(head) + tok(" " + query) + ...`` equals
    ``tok(full prompt)``. Adapters store these three strings, so they are scored with
    the exact prompt they were trained on whatever the default becomes.
    """

    head: str
    middle: str
    tail: str

    def render(self, query: str, doc: str) -> str:
        """The complete prompt string, up to (not including) the answer token."""
        return f"{self.head} {query}{self.middle} {doc}{self.tail}"

    def to_dict(self) -> dict[str, str]:
        return {"head": self.head, "middle": self.middle, "tail": self.tail}

    @classmethod
    def from_dict(cls, value, source: str = "prompt_template") -> "PromptTemplate":
        if not (isinstance(value, dict) and all(isinstance(value.get(k), str) for k in ("head", "middle", "tail"))):
            raise ESCIDataError(f"{source}: expected an object with string fields head, middle, tail; got {value!r}"[:300])
        return cls(value["head"], value["middle"], value["tail"])


_QUERY_SLOT, _DOC_SLOT = "\x00QUERY\x00", "\x00DOC\x00"


def build_template(instruction: str = INSTRUCT, system: str = SYSTEM_PROMPT) -> PromptTemplate:
    """The chat template for an instruction (``train.py --instruction``) and system prompt."""
    if not instruction.strip():
        raise ESCIDataError("the instruction is empty; omit --instruction to use the default")
    text = CHAT_HEAD.format(system=system) + format_instruction(instruction, _QUERY_SLOT, _DOC_SLOT) + CHAT_TAIL
    head, rest = text.split(_QUERY_SLOT)
    middle, tail = rest.split(_DOC_SLOT)
    if not (head.endswith(" ") and middle.endswith(" ")):
        raise AssertionError("the template must put one space before each slot")
    return PromptTemplate(head[:-1], middle[:-1], tail)


def check_instruction_is_text(instruction: str | None, tokenizer) -> None:
    """Refuse an instruction holding the text of a control token (``<|im_end|>``, ``</think>``, ...): the
    template is tokenized with them live, so such an instruction would close the turn or open the answer.
    Queries and items are safe by construction (:meth:`PromptEncoder.encode_text`)."""
    if instruction is None:
        return
    found = [token for token in getattr(tokenizer, "get_added_vocab", dict)() if token and token in instruction]
    if found:
        raise ESCIDataError(f"--instruction {instruction!r} contains the control token(s) {', '.join(found[:5])}, "
                            "which would change the prompt's structure; write the instruction as plain text")


DEFAULT_TEMPLATE = build_template()

# Qwen3-Reranker's published prompt (its model card): the same chat turns and user-turn layout, a yes/no system
# prompt and a web-search instruction; its score is P(yes), the softmax over the "no" and "yes" logits.
# eval.py --baseline qwen3-reranker scores with it (tiny_reranker.baselines).
QWEN3_RERANKER_SYSTEM = ('Judge whether the Document meets the requirements based on the Query and the Instruct '
                         'provided. Note that the answer can only be "yes" or "no".')
QWEN3_RERANKER_INSTRUCT = "Given a web search query, retrieve relevant passages that answer the query"
QWEN3_RERANKER_ANSWERS = ("no", "yes")  # vocabulary tokens (no leading space: they follow "\n\n")

# The template of PROMPT_VERSION "esci-4way-v2", kept verbatim: adapters trained with it (before
# templates were stored with the adapter) must still be scored with the prompt they learned.
V2_TEMPLATE = PromptTemplate(
    head="<|im_start|>system\nJudge how well the Document (a product) matches the shopping Query, following the "
         'Instruct. Answer with exactly one word: "exact", "substitute", "complement" or "irrelevant".<|im_end|>\n'
         "<|im_start|>user\n<Instruct>: Given a shopping query and a product, answer exact if the product fully "
         "matches the query, substitute if it is a different product that could replace it, complement if it does "
         "not match but could be used together with a matching product, or irrelevant otherwise\n<Query>:",
    middle="\n<Document>:",
    tail=CHAT_TAIL,
)
TEMPLATES_BY_VERSION = {"esci-4way-v2": V2_TEMPLATE, PROMPT_VERSION: DEFAULT_TEMPLATE}


def render_prompt(query: str, doc: str, template: PromptTemplate = DEFAULT_TEMPLATE) -> str:
    """The complete prompt string, up to (not including) the answer token."""
    return template.render(query, doc)


def prompt_pieces(template: PromptTemplate = DEFAULT_TEMPLATE) -> tuple[str, str, str]:
    """``(head, middle, tail)`` of a template (see :class:`PromptTemplate`)."""
    return template.head, template.middle, template.tail


# ---------------------------------------------------------------------------
# Label tokens
# ---------------------------------------------------------------------------
# Tried in order; the first form under which all four words are single, distinct
# tokens wins. Qwen3 splits bare "substitute" into "sub"+"stitute" but has
# " substitute" (leading space) as one token, so Qwen3 resolves to the spaced form.
LABEL_WORD_FORMS = (" {word}", "{word}")


def label_words(tokenizer) -> list[str]:
    """The four answer strings (in ``LABELS`` order) whose single tokens the model predicts."""
    attempts = []
    for form in LABEL_WORD_FORMS:
        words = [form.format(word=LABEL_TEXT[label]) for label in LABELS]
        pieces = [tokenizer.encode(w, add_special_tokens=False) for w in words]
        if all(len(p) == 1 for p in pieces) and len({p[0] for p in pieces}) == len(LABELS):
            return words
        attempts.append(", ".join(
            f"{label}={w!r}->{tokenizer.convert_ids_to_tokens(p)}" for label, w, p in zip(LABELS, words, pieces)
        ))
    raise ValueError(
        "cannot map the four ESCI labels to four distinct single tokens with this tokenizer; "
        "each label must be ONE token. Tokenizations tried: " + " | ".join(attempts)
    )


def label_token_ids(tokenizer) -> list[int]:
    """Four distinct token ids, in ``LABELS`` order: the answer tokens the head reads."""
    return [tokenizer.encode(w, add_special_tokens=False)[0] for w in label_words(tokenizer)]


# ---------------------------------------------------------------------------
# Tokenization with truncation that never touches the template
# ---------------------------------------------------------------------------
# The least room a prompt leaves for query + item text: below it, items are cut to nothing.
MIN_TEXT_TOKENS = 32


def plain_text_tokenizer(tokenizer):
    """A fast tokenizer's backend without its added tokens (None for slow tokenizers).

    Added tokens (Qwen3: ``<|im_end|>``, ``<think>``, ``</think>``, ``<tool_call>``, ...) are
    matched before the BPE model runs; ``split_special_tokens`` only disables the ones
    flagged special. Without any added tokens, such strings fall through to BPE and come
    out as ordinary text pieces. The copy shares the backend's BPE model, normalizer,
    pre-tokenizer and decoder (none of them is ever changed) and has no post-processor,
    so building it costs microseconds; it is built once per tokenizer object.
    """
    if not getattr(tokenizer, "is_fast", False):
        return None
    cached = _PLAIN_TEXT_BACKENDS.get(tokenizer)
    if cached is not None:
        return cached
    from tokenizers import Tokenizer

    backend = tokenizer.backend_tokenizer
    plain = Tokenizer(backend.model)
    for part in ("normalizer", "pre_tokenizer", "decoder"):
        if getattr(backend, part) is not None:
            setattr(plain, part, getattr(backend, part))
    _PLAIN_TEXT_BACKENDS[tokenizer] = plain
    return plain


_PLAIN_TEXT_BACKENDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # tokenizer -> its plain backend


_CHARS_PER_TOKEN_BOUND = 16  # a long text is cut no earlier than 16 characters per token it may need


def byte_level_bpe(backend) -> bool:
    """Whether a ``tokenizers.Tokenizer`` is byte-level BPE with no normalizer or NFC (GPT-2, Qwen, Llama 3,
    SmolLM): the kind whose pre-token boundaries :meth:`PromptEncoder.cut_long_text` relies on."""
    spec = json.loads(backend.to_str())
    normalizer = spec.get("normalizer")
    return ("ByteLevel" in json.dumps(spec.get("pre_tokenizer")) and spec.get("model", {}).get("type") == "BPE"
            and (normalizer is None or normalizer.get("type") == "NFC"))


class PromptEncoder:
    """Turns (query, doc) pairs into prompt token ids of at most ``max_length``.

    The template pieces are tokenized once. Only the document is cut; if the
    query alone does not fit, the query is cut too and the document dropped.
    The complete assistant prefix always ends the sequence, so the answer is
    read from the right position.
    """

    def __init__(self, tokenizer, max_length: int = 512, template: PromptTemplate = DEFAULT_TEMPLATE):
        enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
        self.tokenizer, self.template = tokenizer, template
        self.head_ids, self.middle_ids, self.tail_ids = enc(template.head), enc(template.middle), enc(template.tail)
        self.fixed_len = len(self.head_ids) + len(self.middle_ids) + len(self.tail_ids)
        self.max_length = max_length
        if max_length < self.fixed_len + MIN_TEXT_TOKENS:
            raise ESCIDataError(
                f"max_length={max_length} is too small: the prompt template alone takes {self.fixed_len} tokens, "
                f"and the query and item need room too; use at least {self.fixed_len + MIN_TEXT_TOKENS} "
                "(512 covers almost every ESCI pair)"
            )
        self._plain = plain_text_tokenizer(tokenizer)
        self._cut_safe = self._plain is not None and byte_level_bpe(self._plain)
        self.n_encoded = self.n_items_cut_below_half = 0

    def encode_text(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of user text (``" " + text``) in which no control or added token can appear.

        ``<|im_end|>``, ``</think>`` and every other added token typed into a query or
        product text is tokenized as the plain characters it is, so user data can never
        close the turn, open the answer or plant a label.
        """
        if self._plain is not None:
            texts = [" " + self.cut_long_text(t) for t in texts]
            return [e.ids for e in self._plain.encode_batch(texts, add_special_tokens=False)]
        texts = [" " + t for t in texts]
        return self.tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def cut_long_text(self, text: str) -> str:
        """``text`` cut before tokenizing when it is far longer than a prompt can hold (a 1 MB item took seconds
        to tokenize, all but its first tokens then thrown away), such that nothing truncation keeps changes.

        The cut is at a pre-token boundary that every byte-level BPE regex (GPT-2's, Qwen's) and NFC keep
        whatever follows: a space after a letter or digit and before a letter. Tokens before it are exactly
        the full text's, and at least ``2 * budget + 1`` of them remain, so truncation (and its "cut below half"
        count) is bit-identical (tested). Other tokenizers, or a text without such a boundary, are not cut.
        """
        budget = self.max_length - self.fixed_len
        start = _CHARS_PER_TOKEN_BOUND * (2 * budget + 1)
        if not self._cut_safe or len(text) <= 2 * start:
            return text
        for i in range(start, len(text) - 1):
            if text[i] == " " and text[i - 1].isalnum() and text[i + 1].isalpha():
                prefix = text[:i]
                kept = self._plain.encode(" " + prefix, add_special_tokens=False).ids
                return prefix if len(kept) >= 2 * budget + 1 else text
        return text

    def encode_batch(self, queries: Sequence[str], docs: Sequence[str]) -> list[list[int]]:
        """Token ids for each pair; ``len(ids) <= max_length`` always."""
        q_ids, d_ids = self.encode_text(queries), self.encode_text(docs)
        budget = self.max_length - self.fixed_len
        out = []
        for q, d in zip(q_ids, d_ids):
            full = len(d)
            if len(q) > budget:
                q, d = q[:budget], []
            else:
                d = d[: budget - len(q)]
            self.n_items_cut_below_half += len(d) < full / 2
            out.append(self.head_ids + q + self.middle_ids + d + self.tail_ids)
        self.n_encoded += len(out)
        return out

    def truncation_warning(self) -> str | None:
        """A sentence for the run summary when more than 5% of items lost over half their tokens, else None."""
        if self.n_encoded and self.n_items_cut_below_half > 0.05 * self.n_encoded:
            share = self.n_items_cut_below_half / self.n_encoded
            return (f"{self.n_items_cut_below_half} of {self.n_encoded} items ({share:.0%}) were cut to under half "
                    f"their length to fit max_length={self.max_length}; consider a larger --max_length")
        return None

    def encode(self, query: str, doc: str) -> list[int]:
        return self.encode_batch([query], [doc])[0]


def encode_rows(encoder: PromptEncoder, queries: Sequence[str], docs: Sequence[str], labels: Sequence[str]) -> dict:
    """Labelled pairs as token columns, the one definition of a training row (the in-memory dataset below and
    ``tiny_reranker.data_cache``'s Arrow cache both store exactly this):

    * ``input_ids``: prompt token ids (:meth:`PromptEncoder.encode_batch`);
    * ``labels``: the class index in ``LABELS`` order;
    * ``length``: ``len(input_ids)``.
    """
    ids = encoder.encode_batch(queries, docs)
    return {"input_ids": ids, "labels": [LABEL_TO_ID[label] for label in labels], "length": [len(row) for row in ids]}


class ESCIMultiClassRerankDataset(Dataset):
    """Tokenized ESCI pairs in memory. Items: ``{"input_ids", "attention_mask", "labels"}``.

    ``labels`` is an int 0..3 in ``LABELS`` order. Tokenization happens once, up front, in
    batches (:func:`encode_rows`). ``train.py`` uses the same rows memory-mapped from its
    cache instead (``tiny_reranker.data_cache``), so that many ranks share one copy.
    """

    def __init__(self, df: pd.DataFrame, tokenizer, max_length: int = 512, encode_batch_size: int = 4096,
                 template: PromptTemplate = DEFAULT_TEMPLATE):
        encoder = self.encoder = PromptEncoder(tokenizer, max_length, template)
        queries, docs, labels = df["query"].tolist(), df["item_text"].tolist(), df["esci_label"].tolist()
        self.input_ids: list[np.ndarray] = []
        label_ids: list[int] = []
        for start in range(0, len(df), encode_batch_size):
            stop = start + encode_batch_size
            rows = encode_rows(encoder, queries[start:stop], docs[start:stop], labels[start:stop])
            self.input_ids += [np.asarray(ids, dtype=np.int32) for ids in rows["input_ids"]]
            label_ids += rows["labels"]
        self.labels = np.asarray(label_ids, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict:
        ids = self.input_ids[i].tolist()
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": int(self.labels[i])}

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]


# ---------------------------------------------------------------------------
# Parquet loading and validation
# ---------------------------------------------------------------------------
class ESCIDataError(ValueError):
    """Bad user data. The message names the file, column, rows and values; CLIs print it and exit 2."""


REQUIRED_COLUMNS = ("query", "item_text", "esci_label")
_LABEL_ALIASES = {**{label: label for label in LABELS}, **{text.upper(): label for label, text in LABEL_TEXT.items()}}
_SHOW_ROWS = 5


def _show(value) -> str:
    """A value as a user would recognise it: ``null`` for None/NaN, else its repr (capped)."""
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return "null"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "...'"


def _bad_rows_message(path: str, column: str, problem: str, bad: pd.Series) -> str:
    shown = ", ".join(f"row {idx}: {_show(val)}" for idx, val in bad.head(_SHOW_ROWS).items())
    more = f" (and {len(bad) - _SHOW_ROWS} more)" if len(bad) > _SHOW_ROWS else ""
    return f"{path}: column '{column}' has {len(bad)} {problem} value(s) (rows are 0-based): {shown}{more}"


def normalize_labels(labels: pd.Series, path: str) -> pd.Series:
    """Map ``E/S/C/I`` or the full words (any case, surrounding spaces) to ``E/S/C/I``."""
    mapped = labels.map(lambda v: _LABEL_ALIASES.get(v.strip().upper()) if isinstance(v, str) else None)
    bad = labels[mapped.isna()]
    if len(bad):
        raise ESCIDataError(
            _bad_rows_message(path, "esci_label", "unknown label", bad)
            + f"; expected one of {', '.join(LABELS)} or {', '.join(LABEL_TEXT.values())}"
        )
    return mapped


def validate_text_column(df: pd.DataFrame, column: str, path: str) -> pd.Series:
    """Reject null, non-text or blank values; return the column as str."""
    values = df[column].astype(object)  # categorical / dictionary-encoded columns hold their values as objects
    is_bad = values.map(lambda v: not isinstance(v, str) or not v.strip())
    if is_bad.any():
        raise ESCIDataError(_bad_rows_message(path, column, "null, empty or non-text", values[is_bad]))
    return values.astype(str)


def validate_query_ids(ids: pd.Series, path: str) -> None:
    """Refuse null or non-scalar (list, array, dict) query ids: rows are grouped into queries by them, for the
    held-out split and for nDCG, and such a value would group wrongly or crash the grouping."""
    def bad(value) -> bool:
        return not isinstance(value, Hashable) or isinstance(value, tuple) or bool(pd.isna(value))

    wrong = ids.astype(object)[ids.astype(object).map(bad)]
    if len(wrong):
        raise ESCIDataError(_bad_rows_message(path, "query_id", "null or non-scalar", wrong)
                            + "; every row needs its query's id (or drop the column to group rows by the query text)")


def read_table(path: str, only: Sequence[str] | None = None) -> pd.DataFrame:
    """Read a parquet file, a ``.csv`` one (:func:`read_csv_strict`) or a ``.jsonl`` one (predict.py's strict JSON
    lines reader), turning every way it can fail into :class:`ESCIDataError`. ``only``: the columns to keep,
    those the file has (parquet reads no other; the text formats drop the others after reading)."""
    if not os.path.exists(path):
        raise ESCIDataError(f"{path}: file not found")

    def kept(df: pd.DataFrame) -> pd.DataFrame:
        return df if only is None else df[[c for c in df.columns if c in only]]

    if path.lower().endswith(".csv"):
        return kept(read_csv_strict(path))
    if path.lower().endswith(".jsonl"):
        from tiny_reranker.pairs import read_jsonl_file  # lazy: tiny_reranker imports this module

        return kept(pd.DataFrame(read_jsonl_file(path)))
    try:
        columns = None if only is None else [name for name in pq.read_schema(path).names if name in only]
        return pd.read_parquet(path, columns=columns)
    except Exception as exc:  # pyarrow raises many types for unreadable files
        raise ESCIDataError(f"{path}: not a readable parquet file ({type(exc).__name__}: {exc})") from None


def check_csv_shape(path: str) -> None:
    """One streaming pass over a CSV file: a repeated header name, or a row with more or fewer fields than the
    header, is an ESCIDataError naming them (pandas would rename ``query`` to ``query.1``, or make the first
    field of every row an index and drop it, shifting every column)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = csv.reader(f)
            header = next(rows, [])
            repeated = [name for name, n in Counter(header).items() if n > 1]
            if repeated:
                raise ESCIDataError(f"{path}: the header names {', '.join(map(repr, repeated))} more than once; "
                                    "each column needs its own name")
            bad = [(rows.line_num, len(row)) for row in rows if row and len(row) != len(header)]  # a row's last line
    except ESCIDataError:
        raise
    except Exception as exc:  # csv raises several types for unreadable files
        raise ESCIDataError(f"{path}: not a readable CSV file ({type(exc).__name__}: {exc})") from None
    if bad:
        shown = ", ".join(f"line {n}: {k} fields" for n, k in bad[:_SHOW_ROWS])
        more = f" (and {len(bad) - _SHOW_ROWS} more)" if len(bad) > _SHOW_ROWS else ""
        raise ESCIDataError(f"{path}: {len(bad)} row(s) do not have the header's {len(header)} fields "
                            f"(lines are 1-based, the header is line 1): {shown}{more}; quote fields that "
                            "contain commas")


def read_csv_strict(path: str, chunksize: int | None = None):
    """A CSV file as text columns (:func:`check_csv_shape` first): a DataFrame, or with ``chunksize`` an iterator
    of DataFrames of that many rows. All text: no number parsing of ids, and a title "NA" stays "NA"; only empty
    cells are missing."""
    check_csv_shape(path)
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""], index_col=False, chunksize=chunksize)
    except Exception as exc:  # pandas raises several types for unreadable files
        raise ESCIDataError(f"{path}: not a readable CSV file ({type(exc).__name__}: {exc})") from None


def require_columns(df: pd.DataFrame, columns: Sequence[str], path: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ESCIDataError(
            f"{path}: missing required column(s) {', '.join(map(repr, missing))}; "
            f"found columns: {', '.join(map(repr, df.columns))}"
        )


TRAINING_KEYS = ("query", "query_id", "esci_label")  # what splitting, sampling and held-out nDCG read


def load_esci_parquet(path: str, require_labels: bool = True, keys_only: bool = False) -> pd.DataFrame:
    """Load and validate an ESCI parquet file.

    Required columns: ``query``, ``item_text`` and (unless ``require_labels`` is
    False) ``esci_label``, which is normalized to ``E/S/C/I``. Extra columns
    (``query_id``, ``product_id``, ``product_locale``, ...) are kept. Row order is
    preserved and the index reset to 0..n-1. Raises :class:`ESCIDataError`.

    ``keys_only`` reads just :data:`TRAINING_KEYS` (those present): no ``item_text``, by far the largest
    column, which train.py reads only for a split its tokenized cache lacks (:func:`attach_item_text`).
    """
    path = str(path)
    if not os.path.exists(path):
        raise ESCIDataError(f"{path}: file not found. prepare_esci.py makes the train and test parquet files from "
                            "the official ESCI release (README: Data preparation)")
    df = read_table(path, only=TRAINING_KEYS if keys_only else None).reset_index(drop=True)
    required = REQUIRED_COLUMNS if require_labels else REQUIRED_COLUMNS[:2]
    require_columns(df, [c for c in required if not keys_only or c != "item_text"], path)
    if len(df) == 0:
        raise ESCIDataError(f"{path}: the file has no rows")
    for column in ("query",) if keys_only else ("query", "item_text"):
        df[column] = validate_text_column(df, column, path)
    if "query_id" in df.columns:
        validate_query_ids(df["query_id"], path)
    if "esci_label" in df.columns and (require_labels or df["esci_label"].notna().any()):
        df["esci_label"] = normalize_labels(df["esci_label"], path)
    return df


def attach_item_text(df: pd.DataFrame, path: str) -> pd.DataFrame:
    """``df`` (rows of ``path`` read without their item_text, index = the file's row numbers) with its rows'
    ``item_text``, validated as :func:`load_esci_parquet` validates it."""
    text = read_table(path, only=["item_text"]).reset_index(drop=True)
    require_columns(text, ["item_text"], path)
    if len(text) <= (df.index.max() if len(df) else -1):
        raise ESCIDataError(f"{path}: the file changed while it was read (it has {len(text)} rows now)")
    return df.assign(item_text=validate_text_column(text.loc[df.index], "item_text", path))


def query_groups(df: pd.DataFrame) -> pd.Series:
    """What identifies a query: ``query_id`` when present, else the query text."""
    return df["query_id"] if "query_id" in df.columns else df["query"]


def split_by_query(df: pd.DataFrame, eval_ratio: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Deterministic train/eval split in which no query appears on both sides.

    ``ceil(eval_ratio * n_queries)`` queries, drawn with ``seed``, go to eval.
    """
    if not 0.0 <= eval_ratio < 1.0:
        raise ValueError(f"eval_ratio must be in [0, 1), got {eval_ratio}")
    if eval_ratio == 0.0:
        return df, df.iloc[0:0]
    groups = query_groups(df)
    unique = np.array(sorted(groups.astype(str).unique()))
    rng = np.random.default_rng(seed)
    n_eval = min(len(unique) - 1, int(np.ceil(eval_ratio * len(unique))))
    eval_keys = set(rng.permutation(unique)[:n_eval].tolist())
    in_eval = groups.astype(str).isin(eval_keys).to_numpy()
    return df[~in_eval], df[in_eval]
