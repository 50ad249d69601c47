"""Every fast path equals the plain path on the tiny model: prefix-KV reuse, packed batches, token budgets."""

import os

import pytest
import torch

from esci_dataset import PromptEncoder
from tiny_reranker.batching import collate_left_padded, collate_packed
from tiny_reranker.forward import encode_prefix, label_logits

QUERIES = ["usb c charger", "red running shoes for women", "tent", "a very long query " * 12]
DOCS = ["Title: Anker 65W USB-C Charger Brand: Anker", "Title: running shoe, red " * 20, "Title: tent", "short"]


def _features(tokenizer, max_length=512):
    enc = PromptEncoder(tokenizer, max_length)
    return enc, [{"input_ids": ids, "labels": i % 4} for i, ids in enumerate(enc.encode_batch(QUERIES, DOCS))]


def test_prefix_kv_reuse_equals_full_prompt(lora_model, qwen3_tokenizer):
    enc, feats = _features(qwen3_tokenizer)
    prefix = enc.head_ids
    assert all(f["input_ids"][:len(prefix)] == prefix for f in feats)
    lora_model.eval()
    with torch.inference_mode():
        plain = label_logits(lora_model, collate_left_padded(feats, qwen3_tokenizer.pad_token_id))
        pkv = encode_prefix(lora_model, prefix)
        rest = [{"input_ids": f["input_ids"][len(prefix):]} for f in feats]
        reused = label_logits(lora_model, collate_left_padded(rest, qwen3_tokenizer.pad_token_id), prefix_kv=pkv)
    assert pkv.length == len(prefix)
    torch.testing.assert_close(torch.softmax(reused, -1), torch.softmax(plain, -1), atol=1e-5, rtol=0)


def test_packed_batch_matches_padded_loss_and_lora_gradients(lora_model, qwen3_tokenizer):
    _, feats = _features(qwen3_tokenizer)
    results = []
    lora_model.train()
    for batch in (collate_left_padded(feats, qwen3_tokenizer.pad_token_id), collate_packed(feats)):
        lora_model.zero_grad()
        loss = torch.nn.functional.cross_entropy(label_logits(lora_model, batch), batch["labels"])
        loss.backward()
        grads = {n: p.grad.clone() for n, p in lora_model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    lora_model.zero_grad()
    lora_model.eval()
    (padded_loss, padded_grads), (packed_loss, packed_grads) = results
    assert packed_grads and all(g.abs().sum() > 0 for g in padded_grads.values())
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-5, rtol=1e-5)
    for name in padded_grads:
        torch.testing.assert_close(packed_grads[name], padded_grads[name], atol=1e-5, rtol=1e-4)


def test_shared_prefix_training_matches_full_prompts_loss_and_lora_gradients(lora_model, qwen3_tokenizer):
    enc, feats = _features(qwen3_tokenizer)
    pad = qwen3_tokenizer.pad_token_id
    results = []
    lora_model.train()
    for prefix in ([], enc.head_ids):
        lora_model.zero_grad()
        batch = collate_left_padded(feats, pad, skip_prefix=len(prefix))
        prefix_kv = encode_prefix(lora_model, prefix) if prefix else None
        loss = torch.nn.functional.cross_entropy(label_logits(lora_model, batch, prefix_kv=prefix_kv), batch["labels"])
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in lora_model.named_parameters() if p.requires_grad}))
    lora_model.zero_grad()
    lora_model.eval()
    (full_loss, full_grads), (shared_loss, shared_grads) = results
    assert all(g.abs().sum() > 0 for g in full_grads.values())
    torch.testing.assert_close(shared_loss, full_loss, atol=1e-5, rtol=1e-5)
    for name in full_grads:
        torch.testing.assert_close(shared_grads[name], full_grads[name], atol=1e-5, rtol=1e-4)


def test_packed_collator_layout_with_shared_prefix():
    """Two prompts after a 2-token prefix: each attends to the prefix, then to itself (hand-computed)."""
    batch = collate_packed([{"input_ids": [1, 2, 5, 6, 7], "labels": 1}, {"input_ids": [1, 2, 8, 9], "labels": 3}],
                           skip_prefix=2)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[2, 3, 4, 2, 3]]
    assert batch["last_token_mask"].tolist() == [[False, False, True, False, True]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5] and batch["cu_seq_lens_k"].tolist() == [0, 5, 9]
    assert (batch["max_length_q"], batch["max_length_k"]) == (3, 5)
    # keys seen by the cache layer: [p0, p1, 5, 6, 7, 8, 9] -> per prompt [p0, p1, 5, 6, 7] and [p0, p1, 8, 9]
    assert batch["prefix_key_index"].tolist() == [0, 1, 2, 3, 4, 0, 1, 5, 6]
    assert batch["cu_seq_lens_q"].dtype == batch["cu_seq_lens_k"].dtype == torch.int32  # what flash-attn takes


def test_packed_collator_layout():
    batch = collate_packed([{"input_ids": [5, 6, 7], "labels": 1}, {"input_ids": [8, 9], "labels": 3}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["last_token_mask"].tolist() == [[False, False, True, False, True]]
    assert batch["labels"].tolist() == [1, 3]
    assert batch["cu_seq_lens_q"].tolist() == batch["cu_seq_lens_k"].tolist() == [0, 3, 5]
    assert (batch["max_length_q"], batch["max_length_k"]) == (3, 3) and "prefix_key_index" not in batch


def test_bench_smoke_runs_the_real_paths_and_reports_every_ratio(tmp_path, monkeypatch, capsys):
    """Timings are never asserted (shared machines); what must hold is that both eval sides compute the same
    probabilities (fp32, same prompts) and every ratio and breakdown part is reported."""
    import json

    import bench

    monkeypatch.setenv("TMPDIR", str(tmp_path))  # where bench.py makes (and must remove) its workdir
    rc = bench.main(["--model", "tiny", "--n_queries", "1", "--items_per_query", "4", "--repeats", "1",
                     "--dtype", "fp32", "--json", str(tmp_path / "b.json")])
    out = capsys.readouterr().out
    assert rc == 0
    tail = [line.split(": ")[0] for line in out.splitlines() if line.strip()][-5:]
    assert tail == ["eval_speedup_vs_reference", "eval_speedup_vs_same_template_reference",
                    "train_speedup_vs_naive", "train_peak_memory_ratio", "train_prefix_reuse_speedup"]
    numbers = json.loads((tmp_path / "b.json").read_text())
    assert numbers["eval"]["max_prob_diff_same_template"] < 1e-4  # the fast path scores like the reference
    assert numbers["eval"]["published_prompt_tokens"] > numbers["eval"]["our_prompt_tokens"]  # its template is longer
    assert set(numbers["eval"]["published_breakdown_s"]) == {"full-vocabulary head", "padding", "template tokens",
                                                             "floor", "left_to_win"}
    assert numbers["train"]["shared_prefix_tokens"] > 0 and not numbers["train"]["packed"]  # sdpa on CPU
    train = numbers["train"]  # one repeat: each ratio is that repeat's times divided
    assert len(train["ours_prefix_in_every_row_s"]) == len(train["ours_s"]) == len(train["naive_s"]) == 1
    assert train["prefix_reuse_speedup"] == pytest.approx(train["ours_prefix_in_every_row_s"][0] / train["ours_s"][0])
    assert train["speedup"] == pytest.approx(train["naive_s"][0] / train["ours_s"][0])
    assert not [p for p in os.listdir(tmp_path) if p.startswith("tiny-reranker-bench")]  # the workdir is removed


@pytest.mark.parametrize("n", [1, 48, 5000])
def test_length_sorted_batches_cover_every_row_once_within_budget_and_padding(n):
    import numpy as np

    from tiny_reranker.batching import length_sorted_batches

    lengths = np.random.default_rng(n).integers(5, 600, n)
    batches = length_sorted_batches(lengths, batch_size=64, max_batch_tokens=8192, max_padding=0.1)
    assert sorted(np.concatenate(batches).tolist()) == list(range(n))
    for idx in batches:
        longest = lengths[idx].max()
        assert len(idx) <= 64 and (len(idx) == 1 or len(idx) * longest <= 8192)
        assert lengths[idx].min() >= 0.9 * longest
    assert lengths[batches[0]].max() == lengths.max()  # longest first: an OOM shows at once


def test_predict_memory_probe_sees_what_a_process_holds(tmp_path):
    """bench.py --predict_memory reads a fresh process's peak RSS: a script that holds 200 MB must show it."""
    from tiny_reranker.benchmark import catalog_pairs, predict_peak_rss

    script = tmp_path / "hold.py"
    script.write_text("import sys\nblock = bytearray(200 * 2**20)\nblock[::4096] = b'x' * len(block[::4096])\n"
                      "sys.exit(0 if sys.argv[1:] == ['--flag'] else 3)\n")
    peak, seconds = predict_peak_rss(str(script), ["--flag"])
    assert peak > 200 * 2**20 and seconds >= 0
    pairs = catalog_pairs(3, seed=1)
    assert len(pairs) == 3 and pairs["item_text"].str.len().between(1500, 2500).all() and pairs["item_text"].is_unique
