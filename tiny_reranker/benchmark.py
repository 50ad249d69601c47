"""The reference side of ``bench.py``: a synthetic workload with ESCI's length mix, peak-memory sampling, and
the recipes ours is measured against, as published (Qwen3-Reranker's transformers example) or as a
stock causal-LM fine-tune would run them.

``bench.py`` (the timing harness and its CLI) stays a script at the top; this is what it measures with.
"""

from __future__ import annotations

import ctypes
import gc
import os
import threading
import time

import numpy as np
import torch

from tiny_reranker.batching import collate_left_padded, length_sorted_batches
from tiny_reranker.demo_model import build_tiny_model, qwen3_tokenizer_dir
from tiny_reranker.esci_release import WORDS
from tiny_reranker.model_files import check_model_paths
from tiny_reranker.modeling import load_base_model, load_tokenizer, pick_attn_implementation

# Qwen3-tokenizer token counts of query + item_text on real ESCI US rows (title, brand, color, bullets).
ESCI_TOKEN_QUANTILES = [(0.0, 8), (0.05, 19), (0.25, 91), (0.50, 170), (0.75, 268), (0.95, 414), (0.99, 560), (1.0, 700)]
QWEN3_06B_SHAPE = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                       max_position_embeddings=40960)


# ---------------------------------------------------------------------------
# Workload
# ---------------------------------------------------------------------------
def sample_token_lengths(n: int, rng: np.random.Generator) -> np.ndarray:
    """Query+item token counts drawn from the measured ESCI quantiles (inverse CDF, linear between)."""
    qs, vals = zip(*ESCI_TOKEN_QUANTILES)
    return np.round(np.interp(rng.random(n), qs, vals)).astype(int)


def synthetic_pairs(tokenizer, n_queries: int, items_per_query: int, seed: int) -> tuple[list[str], list[str]]:
    """ESCI-like (query, item_text) pairs whose token counts follow ESCI_TOKEN_QUANTILES."""
    rng = np.random.default_rng(seed)
    queries, items = [], []
    for _ in range(n_queries):
        query = " ".join(rng.choice(WORDS, size=int(rng.integers(2, 6))))
        q_len = len(tokenizer.encode(" " + query, add_special_tokens=False))
        for total in sample_token_lengths(items_per_query, rng):
            words = " ".join(rng.choice(WORDS, size=max(1, int(total) - q_len) * 2))
            ids = tokenizer.encode(" " + words, add_special_tokens=False)[: max(1, int(total) - q_len)]
            queries.append(query)
            items.append(tokenizer.decode(ids).strip())
    return queries, items


def load_bench_model(spec: str, dtype: torch.dtype, workdir: str):
    """``(model, tokenizer)`` for ``bench.py --model``: ``tiny``, ``qwen3-0.6b`` (the real shape, random init, no
    download) or a model folder, loaded as every CLI loads one (safetensors only)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    if spec == "tiny":
        path = build_tiny_model(os.path.join(workdir, "tiny-qwen3"))
        return load_base_model(path, dtype), load_tokenizer(path)
    if spec == "qwen3-0.6b":
        tokenizer = load_tokenizer(qwen3_tokenizer_dir())
        config = Qwen3Config(**QWEN3_06B_SHAPE, pad_token_id=tokenizer.pad_token_id,
                             attn_implementation=pick_attn_implementation(dtype=dtype))
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = Qwen3ForCausalLM(config).to(dtype)
        return model, tokenizer
    check_model_paths(spec)
    return load_base_model(spec, dtype), load_tokenizer(spec)


# ---------------------------------------------------------------------------
# Memory probe
# ---------------------------------------------------------------------------
class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator stats, or sampled RSS on CPU."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            # glibc keeps freed memory mapped; hand it back first, or whichever side runs
            # second would reuse the first side's pages and look free.
            gc.collect()
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            self.base, self._stop = _rss(), threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss() - self.base)
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self._stop.set()
            self._thread.join()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------------------
# Eval: the recipe as published
# ---------------------------------------------------------------------------
# Qwen3-Reranker's transformers example, with its "yes"/"no" answer changed to the four ESCI words.
# Its prompt is deliberately NOT ours: this is the recipe a user would start from.
PUBLISHED_SYSTEM = ("Judge whether the Document meets the requirements based on the Query and the Instruct provided. "
                    'Note that the answer can only be "exact", "substitute", "complement" or "irrelevant".')
PUBLISHED_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
PUBLISHED_PREFIX = "<|im_start|>system\n" + PUBLISHED_SYSTEM + "<|im_end|>\n<|im_start|>user\n"
PUBLISHED_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def published_token_ids(tokenizer, queries, items, max_length: int = 512, template: bool = True) -> list[list[int]]:
    """Prompts built as the published example builds them (body truncated to fit). ``template=False``:
    only query + item + the assistant suffix, to measure what the template tokens cost."""
    prefix = tokenizer.encode(PUBLISHED_PREFIX, add_special_tokens=False) if template else []
    suffix = tokenizer.encode(PUBLISHED_SUFFIX, add_special_tokens=False)
    bodies = [f"<Instruct>: {PUBLISHED_INSTRUCTION}\n<Query>: {q}\n<Document>: {d}" if template else f"{q}\n{d}"
              for q, d in zip(queries, items)]
    body_ids = tokenizer(bodies, padding=False, truncation="longest_first", return_attention_mask=False,
                         max_length=max_length - len(prefix) - len(suffix))["input_ids"]
    return [prefix + ids + suffix for ids in body_ids]


@torch.inference_mode()
def reference_eval(model, tokenizer, token_ids, label_ids, batch_size: int, sort_by_length: bool = False,
                   label_rows_only: bool = False) -> np.ndarray:
    """The published scoring loop: batches in input order, left-padded to their longest, a full-vocabulary
    forward, then ``logits[:, -1, label_ids]``. The switches remove one cost each, to time it:
    ``sort_by_length`` (padding as our eval path leaves it: length-sorted batches, each row within 10% of its
    batch's longest) and ``label_rows_only`` (the 4-row head; needs it attached)."""
    device = next(model.parameters()).device
    lengths = [len(t) for t in token_ids]
    if sort_by_length:  # sorting alone leaves the padding inside each batch (all of it when the set fits in one)
        batches = length_sorted_batches(lengths, batch_size, max_batch_tokens=None)
    else:
        batches = [np.arange(start, min(start + batch_size, len(lengths))) for start in range(0, len(lengths), batch_size)]
    probs = np.zeros((len(token_ids), len(label_ids)))
    for idx in batches:
        batch = collate_left_padded([{"input_ids": token_ids[i]} for i in idx], tokenizer.pad_token_id)
        kwargs = {"logits_to_keep": 1} if label_rows_only else {}
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                       **kwargs).logits[:, -1]
        logits = logits if label_rows_only else logits[:, label_ids]
        probs[idx] = torch.softmax(logits.float(), dim=-1).double().cpu().numpy()
    return probs


# ---------------------------------------------------------------------------
# Training: the naive step's batches (a stock causal-LM fine-tune)
# ---------------------------------------------------------------------------
def naive_batches(token_ids, labels, label_ids, batch_size, pad_id, seed):
    """Random order; the label word appended; right-padded to the longest; LM labels only on the answer."""
    order = np.random.default_rng(seed).permutation(len(token_ids))
    for start in range(0, len(order), batch_size):
        rows = [list(token_ids[i]) + [label_ids[labels[i]]] for i in order[start:start + batch_size]]
        longest = max(map(len, rows))
        ids = torch.full((len(rows), longest), pad_id)
        mask = torch.zeros_like(ids)
        lm_labels = torch.full_like(ids, -100)
        for r, row in enumerate(rows):
            ids[r, :len(row)] = torch.tensor(row)
            mask[r, :len(row)] = 1
            lm_labels[r, len(row) - 1] = row[-1]
        yield {"input_ids": ids, "attention_mask": mask, "labels": lm_labels}


# ---------------------------------------------------------------------------
# predict.py's peak memory as the input grows
# ---------------------------------------------------------------------------
ITEM_CHARS = 2000  # a catalog item with title, bullets and description: ~1.9 KB of text


def catalog_pairs(n: int, seed: int = 0):
    """``n`` (query, item_text) pairs whose items are ~2 KB of catalog-like words, every item different."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    n_words = ITEM_CHARS // 7  # WORDS average ~6 characters and a space
    items = [" ".join(words[rng.integers(0, len(words), n_words)]) + f" sku {i}" for i in range(n)]
    queries = [" ".join(words[rng.integers(0, len(words), 3)]) for _ in range(n)]
    return pd.DataFrame({"query": queries, "item_text": items})


def measure_script(script: str, argv: list[str], env: dict | None = None) -> dict:
    """Run ``python script argv...`` in a fresh process and return its cost: ``peak_bytes`` (resident memory of
    the script's own process), ``worker_peak_bytes`` (the largest child it waited for, e.g. a tokenizing worker),
    ``seconds`` (wall) and ``cpu_seconds`` (user + system, itself and its children), and its ``stderr``."""
    import subprocess
    import sys

    code = ("import os, resource, runpy, sys, time; sys.argv = [sys.argv[1], *sys.argv[2:]]; start = time.time(); "
            "sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))\n"
            "rc = 0\ntry:\n    runpy.run_path(sys.argv[0], run_name='__main__')\nexcept SystemExit as e:\n    rc = e.code\n"
            "me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)\n"
            "print('PEAK', me.ru_maxrss * 1024, kids.ru_maxrss * 1024, time.time() - start, "
            "me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime, rc, file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code, script, *argv], capture_output=True, text=True, check=False,
                          env=env)
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("PEAK ")]
    if not line or line[-1].split()[5] != "0":
        raise RuntimeError(f"{script} failed:\n{proc.stderr[-2000:]}")
    _, peak, workers, seconds, cpu, _ = line[-1].split()
    return {"peak_bytes": int(peak), "worker_peak_bytes": int(workers), "seconds": float(seconds),
            "cpu_seconds": float(cpu), "stderr": proc.stderr}


def predict_peak_rss(script: str, argv: list[str]) -> tuple[int, float]:
    """(peak resident memory in bytes, seconds) of ``python script argv...`` run in a fresh process."""
    cost = measure_script(script, argv)
    return cost["peak_bytes"], cost["seconds"]
