"""The 4-row label head and batch invariance on the tiny Qwen3."""

import pytest
import torch

from esci_dataset import PromptEncoder, label_token_ids
from tests.helpers import score_token_ids
from tiny_reranker.batching import collate_left_padded
from tiny_reranker.forward import label_logits
from tiny_reranker.modeling import LabelRowsHead, apply_lora, attach_label_head, detach_label_head, load_base_model

PAIRS = [
    ("usb c charger", "Title: Anker 65W USB-C Charger Brand: Anker"),
    ("red running shoes", "Title: Nike Air Zoom Pegasus running shoe, red, size 10 " * 6),
    ("tent", "Title: 4-person dome tent"),
    ("kids bike helmet with lights and a very long query text", "Title: helmet"),
]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    torch.manual_seed(0)
    m = load_base_model(tiny_model_dir)
    # Non-trivial LoRA weights, so the test covers the adapter path too.
    m = apply_lora(m, r=4, alpha=8, dropout=0.0, target_modules="q_proj,v_proj")
    for name, p in m.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return m.eval()


def _batch(tokenizer, pairs, max_length=512):
    enc = PromptEncoder(tokenizer, max_length)
    return collate_left_padded([{"input_ids": enc.encode(q, d)} for q, d in pairs], tokenizer.pad_token_id)


def test_four_row_head_equals_slice_of_full_logits(model, qwen3_tokenizer):
    ids = label_token_ids(qwen3_tokenizer)
    batch = _batch(qwen3_tokenizer, PAIRS)
    causal_lm = model.get_base_model()
    with torch.no_grad():
        detach_label_head(causal_lm)
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     position_ids=batch["position_ids"]).logits[:, -1, :]
        assert full.shape[-1] == 151936
        attach_label_head(causal_lm, ids)
        assert isinstance(causal_lm.lm_head, LabelRowsHead)
        four = label_logits(model, batch)
    assert four.shape == (len(PAIRS), 4)
    torch.testing.assert_close(four, full[:, ids], atol=1e-5, rtol=1e-5)


def test_head_shares_the_tied_embedding(model, qwen3_tokenizer):
    causal_lm = attach_label_head(model.get_base_model(), label_token_ids(qwen3_tokenizer))
    assert causal_lm.lm_head.weight is causal_lm.get_input_embeddings().weight


def test_pair_probabilities_do_not_depend_on_the_batch(model, qwen3_tokenizer):
    attach_label_head(model.get_base_model(), label_token_ids(qwen3_tokenizer))
    enc = PromptEncoder(qwen3_tokenizer, 512)
    token_ids = [enc.encode(q, d) for q, d in PAIRS]
    lengths = sorted(len(t) for t in token_ids)
    assert lengths[0] < lengths[-1] - 50  # the batch really pads the short pairs
    together = score_token_ids(model, token_ids, qwen3_tokenizer.pad_token_id, batch_size=len(PAIRS))
    alone = score_token_ids(model, token_ids, qwen3_tokenizer.pad_token_id, batch_size=1)
    assert abs(together - alone).max() < 1e-4
    reordered = score_token_ids(model, token_ids[::-1], qwen3_tokenizer.pad_token_id, batch_size=3)[::-1]
    assert abs(reordered - alone).max() < 1e-4


def test_lora_gets_gradients_through_the_head(model, qwen3_tokenizer):
    attach_label_head(model.get_base_model(), label_token_ids(qwen3_tokenizer))
    model.train()
    batch = _batch(qwen3_tokenizer, PAIRS[:2])
    loss = torch.nn.functional.cross_entropy(label_logits(model, batch), torch.tensor([0, 3]))
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    emb = model.get_base_model().get_input_embeddings().weight
    assert not emb.requires_grad and emb.grad is None
    model.zero_grad()
    model.eval()
