"""Packed training rows: the varlen layout (with and without the shared prefix run once), the attention
implementation that runs it without flash-attn, and the start-up check that falls back when a kernel disagrees."""

import contextlib
import types

import pytest
import torch

from esci_dataset import PromptEncoder
from tiny_reranker import compat
from tiny_reranker import trainer as training
from tiny_reranker import varlen
from tiny_reranker.batching import TrainStepCollator, collate_left_padded, collate_packed
from tiny_reranker.forward import label_logits, step_logits

QUERIES = ["usb c charger", "red running shoes for women", "tent", "a very long query " * 12]
DOCS = ["Title: Anker 65W USB-C Charger Brand: Anker", "Title: running shoe, red " * 20, "Title: tent", "short"]


def _features(tokenizer):
    enc = PromptEncoder(tokenizer, 512)
    return enc, [{"input_ids": ids, "labels": i % 4} for i, ids in enumerate(enc.encode_batch(QUERIES, DOCS))]


@contextlib.contextmanager
def attention(model, name):
    """Run ``model`` (the session's peft model) under another attention implementation, then restore sdpa."""
    base = model.get_base_model()
    base.set_attn_implementation(name)
    try:
        yield
    finally:
        base.set_attn_implementation("sdpa")
        model.zero_grad()
        model.eval()


def _loss_and_grads(model, logits, labels):
    model.zero_grad()
    loss = torch.nn.functional.cross_entropy(logits, labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("reuse_prefix", [False, True])
def test_packed_step_matches_padded_full_prompts(lora_model, qwen3_tokenizer, reuse_prefix):
    """A packed step under the varlen implementation (per-prompt sdpa on CPU), with or without the prefix run
    once, gives the plain padded full-prompt step's loss and LoRA gradients. With a wrong key layout or a causal
    mask aligned top-left instead of bottom-right, this fails (checked by hand)."""
    enc, feats = _features(qwen3_tokenizer)
    prefix = enc.head_ids if reuse_prefix else []
    lora_model.train()
    plain = collate_left_padded(feats, qwen3_tokenizer.pad_token_id)
    padded_loss, padded_grads = _loss_and_grads(lora_model, label_logits(lora_model, plain), plain["labels"])
    with attention(lora_model, varlen.register()):
        lora_model.train()
        step = TrainStepCollator(qwen3_tokenizer.pad_token_id, skip_prefix=len(prefix), packed=True)(feats)
        assert step["micro_batches"][0]["input_ids"].shape[1] == sum(len(f["input_ids"]) - len(prefix) for f in feats)
        packed_loss, packed_grads = _loss_and_grads(lora_model, step_logits(lora_model, step, prefix), step["labels"])
    assert all(g.abs().sum() > 0 for g in padded_grads.values())
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-5, rtol=1e-5)
    for name in padded_grads:
        torch.testing.assert_close(packed_grads[name], padded_grads[name], atol=1e-5, rtol=1e-4)


def test_varlen_implementation_scores_padded_batches_as_sdpa(lora_model, qwen3_tokenizer):
    """Without varlen kwargs the implementation is sdpa, masks included: switching a model to it for packed
    training changes nothing else it scores."""
    _, feats = _features(qwen3_tokenizer)
    batch = collate_left_padded(feats, qwen3_tokenizer.pad_token_id)
    with torch.no_grad():
        sdpa = label_logits(lora_model, batch)
        with attention(lora_model, varlen.register()):
            ours = label_logits(lora_model, batch)
    torch.testing.assert_close(ours, sdpa, atol=0, rtol=0)


def test_packed_prefix_batch_needs_its_prefix(lora_model):
    batch = collate_packed([{"input_ids": [1, 2, 5, 6, 7]}, {"input_ids": [1, 2, 8, 9]}], skip_prefix=2)
    with pytest.raises(ValueError, match="without its shared prefix"):
        label_logits(lora_model, batch)


def _trainer(model, enc, pad_token_id):
    """What check_packed_steps reads from a LabelHeadTrainer."""
    collator = TrainStepCollator(pad_token_id, len(enc.head_ids), packed=True)
    return types.SimpleNamespace(model=model, prefix_ids=enc.head_ids, data_collator=collator)


def _top_left_causal(query, key, value, cu_q, cu_k, scaling=None):
    """A kernel with the other causal convention (top-left, as flash-attn < 2.1 had): wrong under a prefix."""
    groups, outs = query.shape[1] // key.shape[1], []
    bq, bk = cu_q.tolist(), cu_k.tolist()
    for (q0, q1), (k0, k1) in zip(zip(bq, bq[1:]), zip(bk, bk[1:])):
        k, v = (t[:, :, k0:k1].repeat_interleave(groups, dim=1) for t in (key, value))
        outs.append(torch.nn.functional.scaled_dot_product_attention(query[:, :, q0:q1], k, v, is_causal=True,
                                                                     scale=scaling))
    return torch.cat(outs, dim=2)


def test_start_up_check_keeps_packing_with_a_right_kernel(lora_model, qwen3_tokenizer):
    enc, feats = _features(qwen3_tokenizer)
    trainer = _trainer(lora_model, enc, qwen3_tokenizer.pad_token_id)
    with attention(lora_model, varlen.register()):
        diff = training.check_packed_steps(trainer, feats, max_micro_batches=4)
    assert diff < 1e-5 and trainer.data_collator.packed


def test_start_up_check_falls_back_to_micro_batches_from_a_wrong_kernel(lora_model, qwen3_tokenizer, monkeypatch,
                                                                          caplog):
    enc, feats = _features(qwen3_tokenizer)
    trainer = _trainer(lora_model, enc, qwen3_tokenizer.pad_token_id)
    monkeypatch.setattr(varlen, "per_prompt_sdpa", _top_left_causal)
    with attention(lora_model, varlen.register()):
        diff = training.check_packed_steps(trainer, feats, max_micro_batches=3)
    assert diff > training.PACKED_CHECK_TOLERANCE
    collator = trainer.data_collator
    assert not collator.packed and collator.skip_prefix == len(enc.head_ids) and collator.max_micro_batches == 3
    assert "uses length-sorted micro-batches instead" in caplog.text


def test_start_up_check_falls_back_when_the_packed_step_raises(lora_model, qwen3_tokenizer, monkeypatch, caplog):
    """A varlen kernel whose signature changed raises instead of disagreeing: training must not die on it."""
    enc, feats = _features(qwen3_tokenizer)
    trainer = _trainer(lora_model, enc, qwen3_tokenizer.pad_token_id)

    def changed_signature(*args, **kwargs):
        raise TypeError("varlen_attn() got an unexpected keyword argument 'scale'")

    monkeypatch.setattr(varlen, "per_prompt_sdpa", changed_signature)
    with attention(lora_model, varlen.register()):
        diff = training.check_packed_steps(trainer, feats, max_micro_batches=3)
    assert diff == float("inf") and not trainer.data_collator.packed
    assert "raised TypeError: varlen_attn()" in caplog.text and "micro-batches instead" in caplog.text


def test_cuda_bf16_training_switches_sdpa_to_the_varlen_implementation(lora_model, monkeypatch):
    """Where PyTorch's kernel runs (simulated: CUDA, bf16, Ampere+), an sdpa model is switched and packs."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(varlen, "cuda_kernel_runs", lambda device, dtype: device.type == "cuda")
    base = lora_model.get_base_model()
    try:
        assert varlen.choose_packed_attention(lora_model)
        assert compat.attn_implementation(base) == varlen.VARLEN_ATTENTION
        assert varlen.choose_packed_attention(lora_model)  # already switched: still packs
    finally:
        base.set_attn_implementation("sdpa")


def test_cpu_training_keeps_micro_batches(lora_model):
    """On CPU a packed step measured as fast as micro-batches (not faster), so sdpa models are not switched."""
    if torch.cuda.is_available():
        pytest.skip("CPU decision")
    assert not varlen.choose_packed_attention(lora_model)
    assert compat.attn_implementation(lora_model.get_base_model()) == "sdpa"


def _kernel_semantics(q, k, v, cu_q, cu_k, causal: bool, scale=None):
    """What PyTorch's varlen kernel computes, written with per-prompt sdpa: ``[T, H, D]`` in and out."""
    assert causal and k.shape[1] == q.shape[1]  # we always ask for causal; heads must match unless GQA is on
    heads_first = lambda t: t.transpose(0, 1)[None]  # noqa: E731
    return varlen.per_prompt_sdpa(heads_first(q), heads_first(k), heads_first(v), cu_q, cu_k, scale)[0].transpose(0, 1)


def kernel_torch_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    return _kernel_semantics(query, key, value, cu_seq_q, cu_seq_k, is_causal)


def kernel_torch_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                      window_size=(-1, -1)):
    return _kernel_semantics(query, key, value, cu_seq_q, cu_seq_k, tuple(window_size) == (-1, 0), scale)


def kernel_torch_2_12(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                      window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    if enable_gqa:
        key, value = (t.repeat_interleave(query.shape[1] // t.shape[1], dim=1) for t in (key, value))
    return _kernel_semantics(query, key, value, cu_seq_q, cu_seq_k, tuple(window_size) == (-1, 0), scale)


@pytest.mark.parametrize("kernel", [kernel_torch_2_10, kernel_torch_2_11, kernel_torch_2_12])
def test_cuda_kernel_call_adapts_to_each_torch_signature(kernel, monkeypatch):
    """PyTorch's varlen_attn (new in 2.10) changed its signature up to 2.12 (``is_causal`` -> ``window_size``; ``scale``
    and ``enable_gqa`` added). Our call gives the same attention under each, with GQA heads and a non-default
    scale, as the per-prompt sdpa path, here through stand-ins with each documented signature."""
    monkeypatch.setattr(varlen, "torch_varlen_kernel", lambda: kernel)
    torch.manual_seed(0)
    lengths, prefix, heads, kv_heads, dim = [3, 5, 2], 4, 4, 2, 8
    layout = collate_packed([{"input_ids": [0] * (prefix + n)} for n in lengths], skip_prefix=prefix)
    total_q, total_k = int(layout["cu_seq_lens_q"][-1]), int(layout["cu_seq_lens_k"][-1])
    q = torch.randn(total_q, heads, dim)
    k, v = torch.randn(total_k, kv_heads, dim), torch.randn(total_k, kv_heads, dim)
    args = (layout["cu_seq_lens_q"], layout["cu_seq_lens_k"])
    ours = varlen._cuda_varlen(q, k, v, *args, layout["max_length_q"], layout["max_length_k"], scaling=0.3)
    expected = varlen.per_prompt_sdpa(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                      *args, 0.3)[0].transpose(0, 1)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)
