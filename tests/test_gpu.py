"""GPU-only checks, skipped on CPU machines (CI). On a GPU box: python -m pytest -q tests/test_gpu.py"""

import importlib.util
import json
import os

import pytest
import torch

import train as train_cli
from esci_dataset import PromptEncoder, label_token_ids
from tiny_reranker import compat, varlen
from tiny_reranker.batching import TrainStepCollator, collate_left_padded
from tiny_reranker.forward import label_logits, step_logits
from tiny_reranker.modeling import apply_lora, attach_label_head, load_base_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
flash = pytest.mark.skipif(not (torch.cuda.is_available() and importlib.util.find_spec("flash_attn")
                                and torch.cuda.get_device_capability()[0] >= 8),
                           reason="needs flash-attn on an Ampere or newer GPU")

torch_varlen = pytest.mark.skipif(not (torch.cuda.is_available() and varlen.cuda_kernel_runs(torch.device("cuda"),
                                                                                          torch.bfloat16)),
                                  reason="needs PyTorch's varlen attention kernel on an Ampere or newer GPU")

QUERIES = ["usb c charger", "red running shoes for women", "tent", "hdmi cable 2m"]
DOCS = ["Title: Anker 65W USB-C Charger Brand: Anker", "Title: running shoe, red " * 20, "Title: tent", "Title: cable"]


def _packed_step_against_padded_step(tiny_model_dir, qwen3_tokenizer, packed_attn: str, reuse_prefix: bool):
    """``[(loss, LoRA grads) of a packed step under packed_attn, (loss, grads) of the plain padded sdpa step]`` (bf16)."""
    results = []
    for attn, packed in ((packed_attn, True), ("sdpa", False)):
        torch.manual_seed(0)
        model = load_base_model(tiny_model_dir, torch.bfloat16, no_flash_attn=attn != "flash_attention_2").cuda()
        if attn == varlen.VARLEN_ATTENTION:
            assert varlen.choose_packed_attention(model)  # CUDA + bf16 + PyTorch's kernel: sdpa is switched
        assert compat.attn_implementation(model) == attn
        model = apply_lora(attach_label_head(model, label_token_ids(qwen3_tokenizer)), 4, 8, 0.0, "all-linear")
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05, generator=torch.Generator(p.device).manual_seed(1))
        enc = PromptEncoder(qwen3_tokenizer, 512)
        feats = [{"input_ids": ids, "labels": i % 4} for i, ids in enumerate(enc.encode_batch(QUERIES, DOCS))]
        prefix = enc.head_ids if packed and reuse_prefix else []
        step = TrainStepCollator(qwen3_tokenizer.pad_token_id, skip_prefix=len(prefix), packed=packed)(feats)
        step = {"micro_batches": [{k: v.cuda() if torch.is_tensor(v) else v for k, v in mb.items()}
                                  for mb in step["micro_batches"]],
                "order": step["order"].cuda(), "labels": step["labels"].cuda()}
        loss = torch.nn.functional.cross_entropy(step_logits(model, step, prefix).float(), step["labels"])
        loss.backward()
        results.append((loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}))
    return results


def _assert_same_grads(packed_grads, padded_grads):
    assert packed_grads.keys() == padded_grads.keys() and all(g.abs().sum() > 0 for g in padded_grads.values())
    for name in padded_grads:
        torch.testing.assert_close(packed_grads[name], padded_grads[name], atol=5e-2, rtol=5e-2)


@flash
@pytest.mark.parametrize("reuse_prefix", [False, True])
def test_packed_flash_attention_step_equals_padded_sdpa_step(tiny_model_dir, qwen3_tokenizer, reuse_prefix):
    """flash-attn's varlen kernel, with or without the shared prefix run once, against the plain padded step."""
    (packed_loss, packed_grads), (padded_loss, padded_grads) = _packed_step_against_padded_step(
        tiny_model_dir, qwen3_tokenizer, "flash_attention_2", reuse_prefix)
    assert abs(packed_loss - padded_loss) < 2e-2
    _assert_same_grads(packed_grads, padded_grads)


@torch_varlen
@pytest.mark.parametrize("reuse_prefix", [False, True])
def test_packed_torch_varlen_step_equals_padded_sdpa_step(tiny_model_dir, qwen3_tokenizer, reuse_prefix,
                                                           monkeypatch):
    """PyTorch's own varlen kernel (no flash-attn installed), with or without the prefix, against the padded step."""
    calls, kernel_call = [], varlen._cuda_varlen

    def counted(*args, **kwargs):  # varlen_attention falls back to per-prompt sdpa where the kernel cannot run
        calls.append(1)
        return kernel_call(*args, **kwargs)

    monkeypatch.setattr(varlen, "_cuda_varlen", counted)
    (packed_loss, packed_grads), (padded_loss, padded_grads) = _packed_step_against_padded_step(
        tiny_model_dir, qwen3_tokenizer, varlen.VARLEN_ATTENTION, reuse_prefix)
    assert calls  # the packed step ran through PyTorch's kernel, not the fallback
    assert abs(packed_loss - padded_loss) < 2e-2
    _assert_same_grads(packed_grads, padded_grads)


@cuda
def test_bf16_training_on_gpu_learns(tiny_model_dir, demo_data, tmp_path):
    out = str(tmp_path / "gpu")
    assert train_cli.main(["--base_model", tiny_model_dir, "--train_file", demo_data[0], "--output_dir", out,
                           "--max_length", "256", "--per_device_train_batch_size", "16", "--max_steps", "60",
                           "--learning_rate", "3e-3", "--lora_target_modules", "all-linear", "--dtype", "bf16",
                           "--eval_ratio", "0.1", "--save_steps", "1000", "--logging_steps", "10"]) == 0
    with open(os.path.join(out, "train_metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["eval"]["eval_accuracy"] >= 0.9, metrics["eval"]


@cuda
def test_gpu_scores_match_cpu_scores_in_fp32(tiny_model_dir, qwen3_tokenizer):
    enc = PromptEncoder(qwen3_tokenizer, 512)
    batch = collate_left_padded([{"input_ids": ids} for ids in enc.encode_batch(QUERIES, DOCS)], qwen3_tokenizer.pad_token_id)
    probs = []
    for device in ("cpu", "cuda"):
        model = attach_label_head(load_base_model(tiny_model_dir, torch.float32, no_flash_attn=True),
                                  label_token_ids(qwen3_tokenizer)).to(device).eval()
        with torch.inference_mode():
            probs.append(torch.softmax(label_logits(model, {k: v.to(device) for k, v in batch.items()}), -1).cpu())
    torch.testing.assert_close(probs[1], probs[0], atol=1e-4, rtol=0)
