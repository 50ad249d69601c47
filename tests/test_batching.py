"""A training step's fast layout (length-sorted micro-batches, shared prefix) gives the plain step's gradient."""

import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import train as train_cli
from esci_dataset import PromptEncoder
from tiny_reranker.batching import TrainStepCollator, collate_left_padded, plan_micro_batches
from tiny_reranker.forward import label_logits, step_logits

QUERIES = ["usb c charger", "red running shoes for women", "tent", "a very long query " * 12, "hdmi", "yoga mat"]
DOCS = ["Title: Anker 65W USB-C Charger Brand: Anker", "Title: running shoe, red " * 20, "Title: tent", "short",
        "Title: HDMI 2.1 cable, 2 m " * 6, "Title: mat"]


def test_plan_covers_every_row_once_and_cuts_padding():
    lengths = np.array([40, 400, 42, 390, 41, 395, 44, 120])
    groups = plan_micro_batches(lengths, max_micro_batches=4)
    assert sorted(np.concatenate(groups).tolist()) == list(range(len(lengths)))
    assert 1 < len(groups) <= 4
    padded = sum(len(g) * lengths[g].max() for g in groups)
    assert padded < 0.6 * len(lengths) * lengths.max()  # one padded batch would cost len * 400
    for g in groups:
        assert lengths[g].max() - lengths[g].min() <= 80  # rows of one micro-batch are of similar length


def test_plan_keeps_one_batch_when_cutting_saves_little():
    assert [g.tolist() for g in plan_micro_batches([100, 101, 99, 100], max_micro_batches=4)] == [[2, 0, 3, 1]]
    assert len(plan_micro_batches([10, 500], max_micro_batches=1)) == 1
    assert plan_micro_batches([], 4) == []


def test_plan_is_optimal_on_a_hand_computed_case():
    # lengths 1,1,10,10 in two groups: {1,1},{10,10} costs 2 + 20 = 22, the least of any 2-cut.
    groups = plan_micro_batches([10, 1, 10, 1], max_micro_batches=2, min_saving=0.0)
    assert sorted(sorted(g.tolist()) for g in groups) == [[0, 2], [1, 3]]


def _loss_and_grads(model, logits, labels):
    model.zero_grad()
    loss = torch.nn.functional.cross_entropy(logits, labels)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return loss.detach(), grads


@pytest.mark.parametrize("reuse_prefix", [False, True])
def test_micro_batched_step_equals_plain_padded_step(lora_model, qwen3_tokenizer, reuse_prefix):
    enc = PromptEncoder(qwen3_tokenizer, 512)
    feats = [{"input_ids": ids, "labels": i % 4} for i, ids in enumerate(enc.encode_batch(QUERIES, DOCS))]
    pad = qwen3_tokenizer.pad_token_id
    lora_model.train()
    plain = collate_left_padded(feats, pad)
    ref_loss, ref_grads = _loss_and_grads(lora_model, label_logits(lora_model, plain), plain["labels"])

    prefix = enc.head_ids if reuse_prefix else []
    step = TrainStepCollator(pad, skip_prefix=len(prefix), max_micro_batches=3)(feats)
    assert len(step["micro_batches"]) > 1  # the fast layout is really in use
    assert step["labels"].tolist() == plain["labels"].tolist()
    loss, grads = _loss_and_grads(lora_model, step_logits(lora_model, step, prefix), step["labels"])
    lora_model.eval()
    assert all(g.abs().sum() > 0 for g in ref_grads.values())
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4)


def _one_update(model_dir, data, out, batch, accumulation):
    """Two SGD steps (the update is lr x gradient, so any loss scaling error shows) from train.py."""
    assert train_cli.main(["--base_model", model_dir, "--train_file", data, "--output_dir", out, "--max_length", "192",
                           "--per_device_train_batch_size", str(batch), "--gradient_accumulation_steps", str(accumulation),
                           "--max_steps", "2", "--optim", "sgd", "--learning_rate", "0.5", "--warmup_ratio", "0",
                           "--lr_scheduler_type", "constant", "--lora_dropout", "0", "--eval_ratio", "0",
                           "--save_steps", "1000", "--dtype", "fp32", "--seed", "3"]) == 0
    return load_file(os.path.join(out, "adapter_model.safetensors"))


def test_gradient_accumulation_equals_the_larger_batch(tiny_model_dir, demo_data, tmp_path):
    big = _one_update(tiny_model_dir, demo_data[0], str(tmp_path / "bs8"), batch=8, accumulation=1)
    accumulated = _one_update(tiny_model_dir, demo_data[0], str(tmp_path / "bs4x2"), batch=4, accumulation=2)
    assert big.keys() == accumulated.keys()
    assert any(v.abs().sum() > 0 for k, v in big.items() if "lora_B" in k)  # B starts at 0: the steps moved it
    for key in big:
        torch.testing.assert_close(accumulated[key], big[key], atol=1e-5, rtol=1e-4)
