"""Sharded scoring: the shard/gather helpers put every row back in its place, and eval.py under torchrun
(2 CPU processes, gloo) saves the same scores in the same row order as one process."""

import json
import os

import numpy as np
import pandas as pd
import pytest

import eval as eval_cli
from tests.conftest import ROOT, run_torchrun
from tiny_reranker import demo_model
from tiny_reranker.distributed import Shard, shard_rows, unshard
from tiny_reranker.scoring import PROB_COLUMNS


# ---------------------------------------------------------------------------
# The helpers (no processes)
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_shards_cover_every_row_once_and_unshard_restores_input_order(world_size):
    for n in range(0, 12):
        shards = [shard_rows(n, rank, world_size) for rank in range(world_size)]
        assert sorted(np.concatenate(shards).tolist()) == list(range(n))  # every row exactly once
        assert max(map(len, shards)) - min(map(len, shards)) <= 1  # balanced
        rows = np.arange(n * 4, dtype=np.float32).reshape(n, 4)  # row i holds 4i .. 4i+3
        parts = [rows[shard] for shard in shards]  # what each rank would score
        np.testing.assert_array_equal(unshard(parts, n), rows)


def test_unshard_refuses_a_part_of_the_wrong_length():
    with pytest.raises(RuntimeError, match="rank 1 returned 1 rows, expected 2"):
        unshard([np.zeros((2, 4)), np.zeros((1, 4))], 4)


def test_one_process_shard_is_everything_and_gathers_nothing():
    shard = Shard()
    assert shard.is_main and shard.take(["a", "b", "c"]) == ["a", "b", "c"]
    part = np.ones((3, 4))
    assert shard.gather(part, 3) is part
    assert Shard(rank=1, world_size=2).take(["a", "b", "c", "d", "e"]) == ["b", "d"]


# ---------------------------------------------------------------------------
# eval.py under torchrun equals one process
# ---------------------------------------------------------------------------


def test_torchrun_eval_saves_the_single_process_scores_in_input_order(tiny_model_dir, adapter_dir, tmp_path):
    df = demo_model.synthetic_esci(3, items_per_query=5, seed=11)  # 15 rows: the 2 ranks get 8 and 7
    df.loc[4, "item_text"] += " with a much longer description" * 3  # unequal lengths, several batches
    data = tmp_path / "eval.parquet"
    df.to_parquet(data, index=False)
    common = ["--base_model", tiny_model_dir, "--lora_model", adapter_dir, "--dtype", "fp32", "--eval_file", str(data),
              "--max_length", "256", "--batch_size", "4", "--no_plots"]

    def outputs(name):
        return ["--save_scores_path", str(tmp_path / name / "scores.parquet"),
                "--metrics_path", str(tmp_path / name / "metrics.json")]

    proc = run_torchrun(os.path.join(ROOT, "eval.py"), *common, *outputs("two"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert eval_cli.main([*common, *outputs("one")]) == 0

    two, one = pd.read_parquet(tmp_path / "two" / "scores.parquet"), pd.read_parquet(tmp_path / "one" / "scores.parquet")
    assert two["product_id"].tolist() == df["product_id"].tolist()  # input order, not rank order
    np.testing.assert_allclose(two[list(PROB_COLUMNS)].to_numpy(), one[list(PROB_COLUMNS)].to_numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(two["score"], one["score"], rtol=0, atol=1e-6)
    assert two["pred_label"].tolist() == one["pred_label"].tolist()
    with open(tmp_path / "two" / "metrics.json") as f:
        assert json.load(f)["n"] == len(df)  # rank 0 reported on every row
    assert sorted(os.listdir(tmp_path / "two")) == ["metrics.json", "scores.parquet"]  # one writer, no temp files
    assert proc.stdout.count("most confident mistakes") == 1  # only rank 0 prints the report
