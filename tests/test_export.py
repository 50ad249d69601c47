"""export.py: merged and seq_cls exports load with plain transformers and give the adapter's probabilities."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import export as export_cli
from esci_dataset import LABELS, ESCIDataError, render_prompt
from tests.helpers import score_token_ids
from tiny_reranker import demo_model
from tiny_reranker.contract import LABEL_CONFIG_NAME
from tiny_reranker.modeling import attach_label_head
from tiny_reranker.reranker import Reranker

MAX_LENGTH = 256
ATOL = 1e-4  # fp32; observed differences are ~1e-7


@pytest.fixture(scope="module")
def exports(tiny_model_dir, adapter_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports") / "export"  # not there yet: export.py creates it, like mkdir -p
    out = {}
    for fmt in export_cli.FORMATS:
        out[fmt] = str(root / fmt)
        assert export_cli.main(["--base_model", tiny_model_dir, "--lora_model", adapter_dir,
                                "--output_dir", out[fmt], "--format", fmt]) == 0
    assert not [f for f in os.listdir(root) if f.endswith(".tmp")]
    return out


@pytest.fixture(scope="module")
def rr(tiny_model_dir, adapter_dir):
    return Reranker.from_pretrained(tiny_model_dir, adapter_dir, device="cpu", dtype="fp32", max_length=MAX_LENGTH, batch_size=8)


@pytest.fixture(scope="module")
def pairs():
    df = demo_model.synthetic_esci(1, items_per_query=5, seed=7)
    items = df["item_text"].tolist()
    items[2] += " with a longer description" * 4  # unequal lengths, so batches really are padded
    return df["query"][0], items


@pytest.fixture(scope="module")
def reference(rr, pairs):
    query, items = pairs
    ids = rr.encode([query] * len(items), items)
    return ids, rr.predict_probs([query] * len(items), items)


def padded(ids: list[list[int]], pad_id: int, side: str) -> dict[str, torch.Tensor]:
    """``input_ids``/``attention_mask`` padded on ``side``, and the ``position_ids`` our collator would give."""
    longest = max(map(len, ids))
    input_ids = torch.full((len(ids), longest), pad_id)
    mask = torch.zeros((len(ids), longest), dtype=torch.long)
    for row, seq in enumerate(ids):
        cols = slice(0, len(seq)) if side == "right" else slice(longest - len(seq), longest)
        input_ids[row, cols], mask[row, cols] = torch.tensor(seq), 1
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}


def test_the_adapter_really_changes_the_scores(tiny_model_dir, pairs, reference):
    query, items = pairs
    base = Reranker.from_pretrained(tiny_model_dir, device="cpu", dtype="fp32", max_length=MAX_LENGTH)
    assert np.abs(base.predict_probs([query] * len(items), items) - reference[1]).max() > 1e-2


# ---------------------------------------------------------------------------
# --format merged
# ---------------------------------------------------------------------------
@torch.no_grad()
def test_merged_is_a_plain_causal_lm_with_the_same_probabilities(exports, pairs, reference):
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3ForCausalLM

    folder = exports["merged"]
    assert not os.path.exists(os.path.join(folder, "adapter_config.json"))
    with open(os.path.join(folder, LABEL_CONFIG_NAME)) as f:
        label_ids = json.load(f)["label_token_ids"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(model) is Qwen3ForCausalLM and model.lm_head.weight.shape[0] == model.config.vocab_size
    ids, expected = reference

    right = padded(ids, tokenizer.pad_token_id, "right")  # natural positions, read at each row's last real token
    logits = model(input_ids=right["input_ids"], attention_mask=right["attention_mask"]).logits
    last = right["attention_mask"].sum(1) - 1
    probs = torch.softmax(logits[torch.arange(len(ids)), last][:, label_ids], -1).numpy()
    np.testing.assert_allclose(probs, expected, rtol=0, atol=ATOL)

    attach_label_head(model, label_ids)  # left padding through our own batching path
    np.testing.assert_allclose(score_token_ids(model, ids, tokenizer.pad_token_id, 8), expected, rtol=0, atol=ATOL)

    query, items = pairs  # and as `predict.py --base_model <merged>` loads it
    merged = Reranker.from_pretrained(folder, device="cpu", dtype="fp32", max_length=MAX_LENGTH)
    np.testing.assert_allclose(merged.predict_probs([query] * len(items), items), expected, rtol=0, atol=ATOL)


# ---------------------------------------------------------------------------
# --format seq_cls
# ---------------------------------------------------------------------------
@torch.no_grad()
def test_seq_cls_head_config_and_padding_equivalence(exports, reference):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Qwen3ForSequenceClassification

    folder = exports["seq_cls"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    assert type(model) is Qwen3ForSequenceClassification
    assert model.config.num_labels == 4 and model.config.id2label == dict(enumerate(LABELS))
    assert model.score.weight.shape == (4, model.config.hidden_size)
    # The classifier pools at the rightmost token that is not pad_token_id: it must be the tokenizer's pad,
    # and no prompt may end in it (ours end in the template suffix).
    assert model.config.pad_token_id == tokenizer.pad_token_id
    ids, expected = reference
    assert all(seq[-1] != tokenizer.pad_token_id for seq in ids)

    right = padded(ids, tokenizer.pad_token_id, "right")
    logits = model(input_ids=right["input_ids"], attention_mask=right["attention_mask"]).logits
    np.testing.assert_allclose(torch.softmax(logits, -1).numpy(), expected, rtol=0, atol=ATOL)

    left = padded(ids, tokenizer.pad_token_id, "left")
    logits = model(**left).logits  # position_ids counting real tokens, as our collator does
    np.testing.assert_allclose(torch.softmax(logits, -1).numpy(), expected, rtol=0, atol=ATOL)
    # Without position_ids transformers numbers pad slots too; RoPE is relative, so the result is the same.
    logits = model(input_ids=left["input_ids"], attention_mask=left["attention_mask"]).logits
    np.testing.assert_allclose(torch.softmax(logits, -1).numpy(), expected, rtol=0, atol=ATOL)


def test_seq_cls_score_rows_are_the_merged_label_rows(exports):
    from safetensors.torch import load_file

    merged = load_file(os.path.join(exports["merged"], "model.safetensors"))
    seq_cls = load_file(os.path.join(exports["seq_cls"], "model.safetensors"))
    with open(os.path.join(exports["merged"], LABEL_CONFIG_NAME)) as f:
        label_ids = json.load(f)["label_token_ids"]
    assert torch.equal(seq_cls["score.weight"], merged["model.embed_tokens.weight"][label_ids])  # tied in Qwen3
    assert torch.equal(seq_cls["model.layers.0.self_attn.q_proj.weight"], merged["model.layers.0.self_attn.q_proj.weight"])


def test_our_scoring_refuses_a_seq_cls_export_as_its_base_model(exports):
    # Loaded as a causal LM it would lose its score head and the temperature folded into it, and score other
    # probabilities with exit 0; the merged export is the one our tools take.
    with pytest.raises(ESCIDataError, match="sequence classifier .Qwen3ForSequenceClassification"):
        Reranker.from_pretrained(exports["seq_cls"], device="cpu", dtype="fp32")


def test_prompt_file_template_renders_our_prompt(exports):
    with open(os.path.join(exports["seq_cls"], export_cli.PROMPT_FILE)) as f:
        spec = json.load(f)
    query, doc = "usb {c} charger", "Anker 65W {fast} charger"  # braces in values are data, not slots
    assert spec["template"].format(query=query, document=doc) == render_prompt(query, doc)
    assert spec["template"].startswith(spec["prefix"]) and spec["template"].endswith(spec["suffix"])
    assert spec["instruction"] in spec["prefix"]
    assert spec["labels"] == list(LABELS) and spec["score_weights"] == [3.0, 2.0, 1.0, 0.0]
    assert spec["expected_gain_weights"] == [1.0, 0.1, 0.01, 0.0] and set(spec["rank_by"]) == {"score", "expected_gain"}


# ---------------------------------------------------------------------------
# A fresh process with plain transformers (no peft, no project code) ranks the same
# ---------------------------------------------------------------------------
PLAIN_TRANSFORMERS_RANKER = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    def scores(folder, fmt, query, items):
        spec = json.load(open(f"{folder}/reranker_prompt.json"))
        tok = AutoTokenizer.from_pretrained(folder)
        prompts = [spec["template"].format(query=query, document=item) for item in items]
        batch = tok(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
        with torch.no_grad():
            if fmt == "seq_cls":
                logits = AutoModelForSequenceClassification.from_pretrained(folder)(**batch).logits
            else:
                out = AutoModelForCausalLM.from_pretrained(folder)(**batch).logits
                last = batch["attention_mask"].sum(1) - 1 if tok.padding_side == "right" else -1
                logits = out[torch.arange(len(items)), last][:, spec["label_token_ids"]]
        gain = torch.tensor(spec["score_weights"], dtype=torch.float32)
        return (logits.softmax(-1) @ gain / gain.max()).tolist()

    folders, query, items = json.loads(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    result = {fmt: scores(folder, fmt, query, items) for fmt, folder in folders.items()}
    result["modules"] = sorted(m for m in ("peft", "reranker", "esci_dataset") if m in sys.modules)
    print(json.dumps(result))
""")


def test_fresh_process_with_plain_transformers_ranks_like_reranker(exports, rr, pairs, tmp_path):
    query, items = pairs
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "-c", PLAIN_TRANSFORMERS_RANKER, json.dumps(exports), query, json.dumps(items)],
                          capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["modules"] == []  # plain transformers only
    expected = rr.rank(query, items)
    for fmt in export_cli.FORMATS:
        order = sorted(range(len(items)), key=lambda i: -result[fmt][i])
        assert order == [r["index"] for r in expected], fmt
        np.testing.assert_allclose(sorted(result[fmt], reverse=True), [r["score"] for r in expected], rtol=0, atol=ATOL)


# ---------------------------------------------------------------------------
# Errors and --help
# ---------------------------------------------------------------------------
def test_bad_arguments_exit_2_without_traceback(tiny_model_dir, adapter_dir, tmp_path, capsys):
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    not_adapter = tmp_path / "not_adapter"
    not_adapter.mkdir()
    cases = [
        (["--base_model", tiny_model_dir, "--lora_model", str(tmp_path / "absent")], "folder not found"),
        (["--base_model", tiny_model_dir, "--lora_model", str(not_adapter)], "adapter_config.json"),
        (["--base_model", str(tmp_path / "nobase"), "--lora_model", adapter_dir], "base_model"),
        (["--base_model", tiny_model_dir, "--lora_model", adapter_dir, "--output_dir", str(full)], "--overwrite"),
    ]
    for argv, must in cases:
        if "--output_dir" not in argv:
            argv = [*argv, "--output_dir", str(tmp_path / "out")]
        assert export_cli.main([*argv, "--format", "merged"]) == 2, argv
        err = capsys.readouterr().err
        assert err.strip().splitlines()[-1].startswith("error: ") and must in err and "Traceback" not in err
    assert (full / "keep.txt").exists() and not (tmp_path / "out").exists()


def _fake_inputs(tmp_path):
    """A base folder and an adapter folder (with a checkpoint) as the path checks see them; nothing loads."""
    base, lora = tmp_path / "runs" / "base", tmp_path / "runs" / "lora"
    (lora / "checkpoint-10").mkdir(parents=True)
    base.mkdir()
    for path, text in {lora / "adapter_config.json": "{}", lora / "adapter_model.safetensors": "weights",
                       lora / "checkpoint-10" / "trainer_state.json": "{}", base / "config.json": "{}"}.items():
        path.write_text(text)
    return base, lora


def _tree(folder) -> dict:
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f)).read()
            for d, _, files in os.walk(folder) for f in files}


@pytest.mark.parametrize("target, overwrite, words", [
    ("runs/lora", True, "is the --lora_model"),       # used to delete the adapter and its checkpoints
    ("runs/lora_link", True, "is the --lora_model"),  # the same folder through a symlink
    ("runs", True, "contains the --lora_model"),      # used to delete the adapter's parent folder
    ("runs/lora/export", False, "is inside the --lora_model"),
    ("runs/base", True, "is the --base_model"),
])
def test_export_never_deletes_or_mixes_with_its_inputs(target, overwrite, words, tmp_path, capsys, monkeypatch):
    base, lora = _fake_inputs(tmp_path)
    os.symlink(lora, tmp_path / "runs" / "lora_link")
    before = _tree(tmp_path / "runs")
    monkeypatch.setattr(export_cli, "merged_causal_lm", lambda *a: pytest.fail("the model loaded before the checks"))
    argv = ["--base_model", str(base), "--lora_model", str(lora), "--output_dir", str(tmp_path / target),
            "--format", "merged", *(["--overwrite"] if overwrite else [])]
    assert export_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
    assert _tree(tmp_path / "runs") == before


def test_overwrite_refuses_a_folder_that_is_not_an_export(tmp_path, capsys, monkeypatch):
    base, lora = _fake_inputs(tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text("{}")  # a model folder of the user's, not one of our exports
    monkeypatch.setattr(export_cli, "merged_causal_lm", lambda *a: pytest.fail("the model loaded before the checks"))
    argv = ["--base_model", str(base), "--lora_model", str(lora), "--output_dir", str(mine), "--format", "merged", "--overwrite"]
    assert export_cli.main(argv) == 2
    assert "not an earlier export" in capsys.readouterr().err and _tree(mine) == {"config.json": "{}"}


def test_overwrite_replaces_an_earlier_export_and_says_what_it_removed(exports, tiny_model_dir, adapter_dir, tmp_path, capsys,
                                                                       caplog):
    out = tmp_path / "export"
    shutil.copytree(exports["seq_cls"], out)
    (out / "stale.bin").write_text("from an older export")
    argv = ["--base_model", tiny_model_dir, "--lora_model", adapter_dir, "--output_dir", str(out), "--format", "merged"]
    assert export_cli.main(argv) == 2 and "--overwrite" in capsys.readouterr().err  # not without the flag
    assert export_cli.main([*argv, "--overwrite"]) == 0
    removed = [r.getMessage() for r in caplog.records if "removed the earlier export" in r.getMessage()]
    assert len(removed) == 1 and "stale.bin" in removed[0] and str(out) in removed[0]
    assert not (out / "stale.bin").exists() and json.load(open(out / "config.json"))["architectures"] == ["Qwen3ForCausalLM"]
    assert sorted(os.listdir(tmp_path)) == ["export"]  # no temp or old folder left beside it


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        export_cli.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--base_model", "--lora_model", "--output_dir", "--format", "merged", "seq_cls", "--bf16", "--overwrite"):
        assert flag in text



def test_readme_seq_cls_snippet_runs_on_a_bf16_export(tiny_model_dir, adapter_dir, rr, tmp_path):
    """The README's plain-transformers snippet, as written, on the --bf16 seq_cls export the README makes."""
    import ast
    import re
    import subprocess
    import sys

    from tests.conftest import ROOT

    out = str(tmp_path / "seq_cls_bf16")
    assert export_cli.main(["--base_model", tiny_model_dir, "--lora_model", adapter_dir, "--output_dir", out,
                            "--format", "seq_cls", "--bf16"]) == 0
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    snippet = re.search(r"With plain transformers.*?```python\n(.*?)```", readme, re.S).group(1)
    snippet = snippet.split("\n# merged:")[0]  # the seq_cls half (test_calibration runs both on T = 2.5 exports)
    assert 'path = "export/seq_cls"' in snippet
    code = snippet.replace('path = "export/seq_cls"', f"path = {out!r}") + "\nprint(score.tolist())\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    scores = json.loads(proc.stdout.strip().splitlines()[-1])
    query, items = ast.literal_eval(re.search(r"query, items = (.*)", snippet).group(1))
    expected = [p["score"] for p in rr.predict([(query, item) for item in items])]
    np.testing.assert_allclose(scores, expected, rtol=0, atol=2e-2)  # the adapter's scores, in bf16
