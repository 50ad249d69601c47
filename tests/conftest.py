"""Shared fixtures: the real Qwen3 tokenizer and a tiny random-init Qwen3 built locally (no network)."""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout (pyproject's pytest pythonpath)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist (pyproject's addopts), split the cores between the workers: more threads than cores
# make every OpenMP region spin and wait, which slows the whole suite many times over.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))  # also for the CLIs the tests start as subprocesses
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from tiny_reranker import demo_model  # noqa: E402


def run_torchrun(script: str, *args: str, nproc: int = 2, timeout: int = 600, env: dict | None = None):
    """``torchrun --nproc_per_node N script args`` on CPU, one thread per rank, on a free port (tests may run
    concurrently). Returns the CompletedProcess (text output captured)."""
    import socket
    import subprocess

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port),
           script, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})})


@pytest.fixture(scope="session")
def tokenizer_dir() -> str:
    return demo_model.qwen3_tokenizer_dir()


@pytest.fixture(scope="session")
def qwen3_tokenizer(tokenizer_dir):
    from tiny_reranker.modeling import load_tokenizer

    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A saved tiny Qwen3ForCausalLM (vocab 151936, real tokenizer) for the whole session."""
    return demo_model.build_tiny_model(str(tmp_path_factory.mktemp("tiny") / "tiny-qwen3"), seed=0)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> tuple[str, str]:
    """Synthetic ESCI-like train/test parquet files (disjoint queries)."""
    return demo_model.write_demo_data(str(tmp_path_factory.mktemp("data")), n_train_queries=240, n_test_queries=40)


@pytest.fixture(scope="session")
def adapter_dir(tiny_model_dir, tmp_path_factory) -> str:
    """A LoRA folder laid out as train.py saves it, with random non-zero B matrices (no training needed)."""
    import torch

    from esci_dataset import label_token_ids
    from tiny_reranker.contract import save_reranker_config
    from tiny_reranker.modeling import (
        DEFAULT_LORA_TARGETS,
        apply_lora,
        attach_label_head,
        load_base_model,
        load_tokenizer,
    )

    out_dir = str(tmp_path_factory.mktemp("adapter") / "lora")
    torch.manual_seed(0)
    tokenizer = load_tokenizer(tiny_model_dir)
    model = apply_lora(attach_label_head(load_base_model(tiny_model_dir), label_token_ids(tokenizer)),
                       r=8, alpha=16, dropout=0.0, target_modules=DEFAULT_LORA_TARGETS)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    save_reranker_config(out_dir, tokenizer, tiny_model_dir)
    return out_dir


@pytest.fixture(scope="session")
def lora_model(tiny_model_dir, qwen3_tokenizer):
    """The tiny Qwen3 with the label head and LoRA on every linear layer, B matrices non-zero (so every
    LoRA weight gets a gradient), fp32. Tests that train it must zero its gradients after use."""
    import torch

    from esci_dataset import label_token_ids
    from tiny_reranker.modeling import apply_lora, attach_label_head, load_base_model

    torch.manual_seed(0)
    model = apply_lora(load_base_model(tiny_model_dir), r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    attach_label_head(model.get_base_model(), label_token_ids(qwen3_tokenizer))
    return model


@pytest.fixture(scope="session")
def mixed_pairs():
    """10 synthetic ESCI rows over two queries, one item made much longer (mixed lengths)."""
    df = demo_model.synthetic_esci(2, items_per_query=5, seed=3)
    df.loc[1, "item_text"] += " with a much longer description" * 3
    return df
