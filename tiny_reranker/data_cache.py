"""Training splits tokenized once per node into memory-mapped Arrow, cached under ``--output_dir``.

``train.py`` calls :func:`tokenize_split` inside ``TrainingArguments.main_process_first()``:
each node's main process builds ``<output_dir>/.tokenized/<split>-<fingerprint>`` with
``datasets.map`` and the other ranks, released once it is done, load it. Every rank then
reads the same memory-mapped files, so the tokens sit once in the page cache instead of
once per rank in Python objects. A later run on the same data loads the cache too.

Columns, and nothing else (training runs with ``remove_unused_columns=False``):

* ``input_ids``: int32 prompt token ids, exactly as ``esci_dataset.encode_rows`` builds them
* ``labels``: the class index in ``LABELS`` order
* ``length``: ``len(input_ids)``; the Trainer's length-grouped sampler reads it (``length_column_name``)

The fingerprint covers everything that decides those values: the data file (path, size,
modification time), the split's rows, the tokenizer, the template pieces, ``max_length`` and
the source of the code that encodes (so a fix there never trains on stale tokens). Changing
any of them makes a new folder; old folders are not used again and may be deleted.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import json
import logging
import os
import shutil
import socket
import time
import uuid
from typing import Callable

import datasets as datasets_progress  # its module-level progress-bar switches
import pandas as pd
import pyarrow.compute as pc
from datasets import ClassLabel, Dataset, Features, Sequence, Value, load_from_disk

from esci_dataset import LABELS, PromptEncoder, encode_rows, plain_text_tokenizer
from tiny_reranker.io import read_json_object, write_json

logger = logging.getLogger(__name__)

CACHE_DIRNAME = ".tokenized"
STATS_NAME = "encode_stats.json"
TEXT_COLUMNS = ["query", "item_text", "esci_label"]
# Below this many rows, starting worker processes costs more than the tokenization they share.
SMALL_SPLIT_ROWS = 50_000
MAX_DEFAULT_WORKERS = 8  # past this, start-up and the per-worker tokenizer copy outweigh the gain


def default_num_proc(n_rows: int) -> int:
    """``map`` workers: one per usable core up to 8, but 1 for small splits and on 2 cores or fewer,
    where the fast tokenizer's own threads already use the cores (2 workers were slower, BENCHMARKS.md)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if n_rows < SMALL_SPLIT_ROWS or cores <= 2:
        return 1
    return min(MAX_DEFAULT_WORKERS, cores)


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the tokenizer's full definition (vocabulary, merges, added tokens, normalizer)."""
    if getattr(tokenizer, "is_fast", False):
        text = tokenizer.backend_tokenizer.to_str()
    else:
        from datasets.fingerprint import Hasher

        text = Hasher.hash(tokenizer)
    return hashlib.sha256(f"{type(tokenizer).__name__}\n{text}".encode()).hexdigest()


def split_fingerprint(df: pd.DataFrame, source: str, encoder: PromptEncoder) -> str:
    """What decides the token ids of ``df``: ``source``'s identity, the rows taken from it, and the encoder."""
    stat = os.stat(source)
    rows = hashlib.sha256(df.index.to_numpy(dtype="int64").tobytes()).hexdigest()
    parts = {
        "code": [inspect.getsource(f) for f in (type(encoder), plain_text_tokenizer, encode_rows, _encode_rows, _features)],
        "source": [os.path.realpath(source), stat.st_size, stat.st_mtime_ns],
        "rows": [len(df), rows],
        "tokenizer": tokenizer_fingerprint(encoder.tokenizer),
        "template": encoder.template.to_dict(),
        "template_ids": [encoder.head_ids, encoder.middle_ids, encoder.tail_ids],
        "max_length": encoder.max_length,
        "labels": list(LABELS),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def _encode_rows(batch: dict, encoder: PromptEncoder) -> dict:
    """One ``map`` batch of text rows -> token columns.

    ``items_cut`` carries the batch's count of items cut to under half their tokens on its first
    row (0 elsewhere): ``map`` workers are separate processes, so the encoder's own counter is
    lost with them. The column is summed and dropped before the split is saved.
    """
    before = encoder.n_items_cut_below_half
    rows = encode_rows(encoder, batch["query"], batch["item_text"], batch["esci_label"])
    rows["items_cut"] = [encoder.n_items_cut_below_half - before] + [0] * (len(rows["input_ids"]) - 1)
    return rows


def _encoder_for_workers(encoder: PromptEncoder) -> PromptEncoder:
    """A copy of ``encoder`` with its own counters, cheap to send to ``map`` workers.

    With a fast tokenizer, ``encode_batch`` only uses the plain-text backend, so the full
    tokenizer (seconds to pickle and unpickle per worker) is left behind.
    """
    copied = copy.copy(encoder)
    if copied._plain is not None:
        copied.tokenizer = None
    return copied


def _features() -> Features:
    # Sequence(Value) is List(Value) in datasets >= 4, and also works in older versions.
    return Features({"input_ids": Sequence(Value("int32")), "labels": ClassLabel(names=list(LABELS)),
                     "length": Value("int32"), "items_cut": Value("int32")})


@contextlib.contextmanager
def quiet_datasets_bars():
    """``datasets``' progress bars off inside the block, back as they were after it."""
    was_on = datasets_progress.is_progress_bar_enabled()
    datasets_progress.disable_progress_bars()
    try:
        yield
    finally:
        if was_on:
            datasets_progress.enable_progress_bars()


OWNER_NAME = "owner.json"  # in a temp build folder: which process builds it


def remove_abandoned_builds(root: str) -> None:
    """Remove the temp build folders of runs that were killed mid-tokenization (each can hold GBs): those whose
    owner is a process of this host that no longer runs. Another host's builds (a shared filesystem) are left."""
    for name in os.listdir(root) if os.path.isdir(root) else []:
        path = os.path.join(root, name)
        try:
            owner = json.load(open(os.path.join(path, OWNER_NAME)))
            if not name.startswith(".tmp-") or owner["host"] != socket.gethostname():
                continue
            os.kill(int(owner["pid"]), 0)  # raises ProcessLookupError when it is gone
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
            logger.info("removed %s, left by a tokenization that was killed", path)
        except (OSError, ValueError, KeyError, TypeError):  # not ours, still being written, or running elsewhere
            continue


def build_split(df: pd.DataFrame, encoder: PromptEncoder, folder: str, num_proc: int, desc: str) -> None:
    """Tokenize ``df`` and save it (``save_to_disk``) with its truncation counts into the new ``folder``.

    Written into a temp folder beside it and renamed, so ``folder`` either does not exist or is
    complete; if another node's main process finished it first, its copy is kept.
    """
    root = os.path.dirname(folder)
    remove_abandoned_builds(root)
    tmp = os.path.join(root, f".tmp-{os.path.basename(folder)}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.makedirs(os.path.join(tmp, "map"))
        write_json(os.path.join(tmp, OWNER_NAME), {"host": socket.gethostname(), "pid": os.getpid()})
        texts = Dataset.from_pandas(df[TEXT_COLUMNS], preserve_index=False)
        # Written to files as it goes (not held in memory), and read back memory-mapped.
        mapped = texts.map(
            _encode_rows, fn_kwargs={"encoder": _encoder_for_workers(encoder)}, batched=True, batch_size=1000,
            num_proc=num_proc if num_proc > 1 else None,  # datasets starts a pool even for num_proc=1
            remove_columns=TEXT_COLUMNS, features=_features(),
            cache_file_name=os.path.join(tmp, "map", "tokens.arrow"),
            new_fingerprint=os.path.basename(folder), desc=desc,
        )
        stats = {"rows": len(mapped), "items_cut_below_half": pc.sum(mapped.data.column("items_cut")).as_py() or 0}
        with quiet_datasets_bars():  # "Saving the dataset (1/1 shards)": a copy the user cannot act on
            mapped.remove_columns("items_cut").save_to_disk(os.path.join(tmp, "dataset"))
        del texts, mapped
        write_json(os.path.join(tmp, "dataset", STATS_NAME), stats)
        try:
            os.rename(os.path.join(tmp, "dataset"), folder)
        except OSError:
            if not os.path.isdir(folder):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class TokenizedSplit(Dataset):
    """A ``datasets.Dataset`` whose ``["length"]`` is a numpy array instead of datasets' lazy ``Column``.

    The Trainer's length-grouped sampler (``--group_by_length``) reads ``train_dataset["length"][i]``
    once per row every epoch. Through a ``Column`` each read costs 0.15-0.4 ms (minutes per
    million rows; datasets >= 4); through numpy, nanoseconds.
    """

    def __getitem__(self, key):
        if key == "length":
            return self.data.column("length").to_numpy()
        return super().__getitem__(key)


def load_split(folder: str, encoder: PromptEncoder) -> TokenizedSplit:
    """The saved split, memory-mapped; its truncation counts are added to ``encoder``'s."""
    stats = read_json_object(os.path.join(folder, STATS_NAME))
    saved = load_from_disk(folder, keep_in_memory=False)
    split = TokenizedSplit(saved.data, info=saved.info, split=saved.split)
    if len(split) != stats["rows"]:
        raise ValueError(f"{len(split)} rows, but {STATS_NAME} says {stats['rows']}")
    encoder.n_encoded += stats["rows"]
    encoder.n_items_cut_below_half += stats["items_cut_below_half"]
    return split


def cache_folder(df: pd.DataFrame, encoder: PromptEncoder, split: str, source: str, output_dir: str) -> str:
    """Where ``df``'s split is (or will be) cached. It depends on ``df``'s rows, not on its columns, so it can be
    found before the item texts are read: a cache hit never needs them."""
    return os.path.join(output_dir, CACHE_DIRNAME, f"{split}-{split_fingerprint(df, source, encoder)}")


def tokenize_split(df: pd.DataFrame, encoder: PromptEncoder, split: str, source: str, output_dir: str,
                   num_proc: int | None = None,
                   add_texts: Callable[[pd.DataFrame], pd.DataFrame] | None = None) -> TokenizedSplit:
    """``df``'s pairs as a ``datasets.Dataset`` of ``input_ids``, ``labels`` and ``length``, from the cache.

    ``source``: the file ``df`` was read from (its identity is part of the cache key). ``split``:
    a name for the folder and the logs. ``num_proc``: ``map`` workers when the cache has to be
    built (default :func:`default_num_proc`). The split's rows and cut items are counted into
    ``encoder``, also on a cache hit, so ``encoder.truncation_warning()`` covers them. ``add_texts``: for a
    ``df`` read without its item_text, returns it with them (called only when the split has to be built).
    """
    folder = cache_folder(df, encoder, split, source, output_dir)
    if os.path.isdir(folder):
        try:
            loaded = load_split(folder, encoder)
            logger.info("loaded tokenized cache %s (%d %s rows)", folder, len(df), split)
            return loaded
        except Exception as exc:  # a damaged cache (a deleted file, a full disk back then) is ours to rebuild
            logger.warning("the tokenized cache %s is damaged (%s: %s); rebuilding it", folder, type(exc).__name__,
                           str(exc).splitlines()[0] if str(exc) else "")
            shutil.rmtree(folder, ignore_errors=True)
    if "item_text" not in df.columns:
        df = add_texts(df)
    num_proc = num_proc or default_num_proc(len(df))
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    start = time.perf_counter()
    build_split(df, encoder, folder, num_proc, desc=f"tokenizing {split}")
    logger.info("tokenized %d %s rows in %.1f s (%d process%s) into %s", len(df), split,
                time.perf_counter() - start, num_proc, "" if num_proc == 1 else "es", folder)
    return load_split(folder, encoder)
