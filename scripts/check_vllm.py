"""Opt-in check: both exports served by vLLM give eval.py's probabilities. Run it through scripts/check_vllm.sh.

    bash scripts/check_vllm.sh                      # builds .venv-vllm the first time (~4 min, 3.5 GB)
    python scripts/check_vllm.py --vllm_python .venv-vllm/bin/python

Runs in this repo's venv and drives vLLM in its own (vLLM's CPU build pins transformers < 5.20; ours is newer):

1. a tiny Qwen3 (head_dim 32: vLLM's CPU attention has no kernel for 16) and synthetic ESCI-like data;
2. train.py for one epoch (it fits a temperature, so the check covers it), export.py in both formats;
3. eval.py --save_scores_path on the test pairs, fp32: the reference probabilities;
4. through vLLM, with what each export's serving.json says: offline ``LLM.classify`` on the seq_cls export,
   offline ``LLM.classify`` on the merged export (hf_overrides, client temperature), and the OpenAI-compatible
   server's POST /classify on each export (serving.json's server command), started on 127.0.0.1 and stopped
   by its PID;
5. predict.py --engine vllm on each export against predict.py on the adapter, at a --max_length that cuts
   the items; and the README's vLLM snippet, as written.

Each must equal eval.py's probabilities within --atol, with the same argmax. The last line is the verdict;
the exit code is 0 when all pass, 1 otherwise.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import numpy as np
import pandas as pd

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tiny_reranker.demo_model import build_tiny_model, write_demo_data  # noqa: E402
from tiny_reranker.scoring import PROB_COLUMNS  # noqa: E402
from tiny_reranker.serving import SERVING_FILE, calibrated  # noqa: E402
from tiny_reranker.vllm_engine import vllm_env  # noqa: E402

MAX_LENGTH = 1024  # every test prompt fits: engines do not truncate, eval.py would
PREDICT_MAX_LENGTH = 96  # predict.py --engine vllm: most items are cut, as predict.py cuts them


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vllm_python", type=str, required=True, help="the python of a venv with vLLM installed")
    p.add_argument("--work_dir", type=str, default=None, help="new or empty folder for the model, exports and "
                   "results, kept (default: a temporary folder, removed at the end when every check passes)")
    p.add_argument("--atol", type=float, default=1e-5, help="largest allowed |probability difference| from eval.py")
    p.add_argument("--no_server", action="store_true", help="skip the OpenAI-compatible server checks")
    p.add_argument("--no_readme", action="store_true", help="skip running the README's vLLM snippet")
    p.add_argument("--no_predict", action="store_true", help="skip predict.py --engine vllm against predict.py")
    p.add_argument("--server_timeout", type=float, default=900, help="seconds to wait for the server to start")
    return p


def run(cmd: list[str], log: str, env: dict | None = None) -> None:
    """``cmd`` to completion, its output in ``log``; a failure ends the check with the log's tail."""
    with open(log, "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if rc != 0:
        with open(log) as f:
            tail = f.read()[-3000:]
        raise SystemExit(f"{shlex.join(cmd)} failed (exit {rc}); the end of {log}:\n{tail}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post_json(url: str, body: dict, timeout: float = 300) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def serve_and_classify(python: str, folder: str, prompts: list[str], log: str, timeout: float) -> list[list[float]]:
    """serving.json's server command (its python replaced by ``python``) on 127.0.0.1, POST /classify, stop."""
    with open(os.path.join(folder, SERVING_FILE)) as f:
        spec = json.load(f)
    port = free_port()
    cmd = [python, *shlex.split(spec["server"])[1:], "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", str(MAX_LENGTH)]
    with open(log, "w") as out:
        server = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=vllm_env(), start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if server.poll() is not None:
                raise SystemExit(f"the vLLM server exited ({server.returncode}) before it was ready; see {log}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"the vLLM server did not answer /health within {timeout:.0f} s; see {log}")
            time.sleep(2)
        reply = post_json(f"{base}/classify", {"model": folder, "input": prompts})
        rows = sorted(reply["data"], key=lambda row: row["index"])
        return [row["probs"] for row in rows]
    finally:
        server.send_signal(signal.SIGTERM)  # stopped by its PID; its engine processes follow it
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def readme_block(after: str) -> str:
    """The first ```python block after ``after`` in README.md."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        text = f.read()
    block = text[text.index(after):]
    block = block[block.index("```python") + len("```python"):]
    return block[:block.index("```")]


def readme_snippet_checks(python: str, work: str, exports: dict, base: str, lora: str, atol: float) -> list:
    """The README's vLLM snippet run as written in the vLLM venv, from a folder where its export/seq_cls and
    export/merged are this check's; its printed scores (seq_cls) and probabilities (merged) against ours."""
    from tiny_reranker.reranker import Reranker

    folder = os.path.join(work, "readme")
    os.makedirs(os.path.join(folder, "export"), exist_ok=True)
    for fmt, path in exports.items():
        if not os.path.lexists(os.path.join(folder, "export", fmt)):
            os.symlink(path, os.path.join(folder, "export", fmt))
    code = readme_block("### Serve an export with vLLM")
    with open(os.path.join(folder, "snippet.py"), "w") as f:
        f.write(code)
    log = os.path.join(work, "readme_snippet.log")
    with open(log, "w") as f:
        proc = subprocess.run([python, "snippet.py"], cwd=folder, stdout=subprocess.PIPE, stderr=f, text=True,
                              env=vllm_env())
    printed = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("[")]
    if proc.returncode != 0 or len(printed) < 2:
        return [(False, f"README vLLM snippet: FAIL, exit {proc.returncode}, printed {proc.stdout[-300:]!r}; see {log}")]
    pairs_line = next(line for line in code.splitlines() if line.strip().startswith("query, items = "))
    query, items = ast.literal_eval(pairs_line.split("=", 1)[1].strip())  # the snippet's own pairs
    probs = Reranker.from_pretrained(base, lora, device="cpu", dtype="fp32").predict_probs([query] * len(items), items)
    score = (probs @ np.array([3.0, 2.0, 1.0, 0.0])) / 3
    got = np.asarray(printed[0], dtype=np.float64)
    diff = float(np.abs(got - score).max()) if got.shape == score.shape else float("inf")
    same_order = got.shape == score.shape and (np.argsort(-got) == np.argsort(-score)).all()
    ok = diff <= atol and same_order
    return [(ok, f"README snippet, seq_cls scores: {'ok' if ok else 'FAIL'}, max |diff| {diff:.1e}, "
                 f"{'same' if same_order else 'another'} order"),
            compare("README snippet, merged probabilities", printed[1:], probs, atol)]


def predict_engine_checks(python: str, work: str, exports: dict, base: str, lora: str, test_file: str,
                          atol: float) -> list:
    """predict.py --engine vllm on each export against predict.py on the adapter: the same rows, probabilities
    within ``atol`` and labels, at a --max_length that cuts most items (so the tokens sent must be ours)."""
    py, script = sys.executable, os.path.join(REPO, "predict.py")
    common = ["--input", test_file, "--dtype", "fp32", "--max_length", str(PREDICT_MAX_LENGTH)]
    reference = os.path.join(work, "predict_transformers.parquet")
    run([py, script, "--base_model", base, "--lora_model", lora, "--output", reference, *common],
        os.path.join(work, "predict_transformers.log"))
    expected = pd.read_parquet(reference)
    checks = []
    for fmt, folder in exports.items():
        print(f"predict.py --engine vllm on the {fmt} export ...", flush=True)
        out = os.path.join(work, f"predict_vllm_{fmt}.parquet")
        run([py, script, "--engine", "vllm", "--vllm_python", python, "--base_model", folder, "--output", out, *common],
            os.path.join(work, f"predict_vllm_{fmt}.log"), vllm_env())
        got = pd.read_parquet(out)
        ok, line = compare(f"predict.py --engine vllm, {fmt}", got[list(PROB_COLUMNS)].to_numpy(np.float64),
                           expected[list(PROB_COLUMNS)].to_numpy(np.float64), atol)
        same_rows = got.drop(columns=[*PROB_COLUMNS, "score"]).equals(expected.drop(columns=[*PROB_COLUMNS, "score"]))
        checks.append((ok and same_rows, line + ("" if same_rows else "; other rows or labels than predict.py's")))
    return checks


def compare(name: str, got, expected: np.ndarray, atol: float) -> tuple[bool, str]:
    got = np.asarray(got, dtype=np.float64)
    if got.shape != expected.shape:
        return False, f"{name}: FAIL, shape {got.shape} against {expected.shape}"
    diff = float(np.abs(got - expected).max())
    same = int((got.argmax(1) == expected.argmax(1)).sum())
    ok = diff <= atol and same == len(expected)
    return ok, f"{name}: {'ok' if ok else 'FAIL'}, max |diff| {diff:.1e}, argmax {same}/{len(expected)}"


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if args.work_dir and os.path.isdir(args.work_dir) and os.listdir(args.work_dir):
        print(f"error: --work_dir {args.work_dir}: exists and is not empty; the check writes models and data there, "
              "so give it a new or empty folder", file=sys.stderr)
        return 2
    work = args.work_dir or tempfile.mkdtemp(prefix="check_vllm_")
    os.makedirs(work, exist_ok=True)
    py, env = sys.executable, {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                               "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
    script = lambda name: os.path.join(REPO, name)  # noqa: E731
    try:
        # 1. A tiny Qwen3 vLLM's CPU attention can run, and data ----------------------------------
        base = build_tiny_model(os.path.join(work, "tiny-qwen3"), head_dim=32)
        train_file, test_file = write_demo_data(os.path.join(work, "data"), n_train_queries=120, n_test_queries=8)
        # 2. Train (a fitted temperature comes with it) and export both formats --------------------
        lora = os.path.join(work, "lora")
        print("training the tiny model, exporting both formats ...", flush=True)
        run([py, script("train.py"), "--base_model", base, "--train_file", train_file, "--output_dir", lora,
             "--max_length", "256", "--per_device_train_batch_size", "16", "--num_train_epochs", "1",
             "--learning_rate", "3e-3", "--eval_ratio", "0.2", "--lora_target_modules", "all-linear",
             "--dtype", "fp32", "--report_to", "none"], os.path.join(work, "train.log"), env)
        exports = {fmt: os.path.join(work, fmt) for fmt in ("merged", "seq_cls")}
        for fmt, folder in exports.items():
            run([py, script("export.py"), "--base_model", base, "--lora_model", lora, "--output_dir", folder,
                 "--format", fmt], os.path.join(work, f"export_{fmt}.log"), env)
        # 3. eval.py's probabilities: the reference -------------------------------------------------
        scores = os.path.join(work, "eval_scores.parquet")
        run([py, script("eval.py"), "--base_model", base, "--lora_model", lora, "--eval_file", test_file,
             "--max_length", str(MAX_LENGTH), "--dtype", "fp32", "--save_scores_path", scores, "--no_plots",
             "--metrics_path", os.path.join(work, "eval_metrics.json")], os.path.join(work, "eval.log"), env)
        table = pd.read_parquet(scores)
        expected = table[list(PROB_COLUMNS)].to_numpy(np.float64)
        with open(os.path.join(exports["seq_cls"], "reranker_prompt.json")) as f:
            template = json.load(f)["template"]  # what a client renders, as the README shows
        prompts = [template.format(query=q, document=d) for q, d in zip(table["query"], table["item_text"])]
        prompts_file = os.path.join(work, "prompts.json")
        with open(prompts_file, "w") as f:
            json.dump(prompts, f)
        with open(os.path.join(exports["merged"], SERVING_FILE)) as f:
            temperature = json.load(f)["client_temperature"]
        # 4. vLLM: offline on both exports, then the server ---------------------------------------
        results, lines = {}, []
        for fmt, folder in exports.items():
            print(f"vLLM offline LLM.classify on the {fmt} export ...", flush=True)
            out = os.path.join(work, f"vllm_{fmt}.json")
            run([args.vllm_python, script("scripts/vllm_classify.py"), "--model", folder, "--prompts", prompts_file,
                 "--output", out, "--max_model_len", str(MAX_LENGTH)], os.path.join(work, f"vllm_{fmt}.log"),
                vllm_env())
            with open(out) as f:
                results[fmt] = json.load(f)
        checks = [compare("seq_cls, offline LLM.classify", results["seq_cls"]["probs"], expected, args.atol),
                  compare(f"merged, offline LLM.classify + client temperature {temperature:.4f}",
                          results["merged"]["probs"], expected, args.atol)]
        raw_diff = float(np.abs(np.asarray(results["merged"]["raw_probs"]) - expected).max())
        lines.append(f"(merged without the client temperature: max |diff| {raw_diff:.2f}, which is why serving.json "
                     "carries it)")
        for fmt, folder in ([] if args.no_server else exports.items()):
            print(f"vLLM OpenAI-compatible server, POST /classify on the {fmt} export ...", flush=True)
            served = serve_and_classify(args.vllm_python, folder, prompts, os.path.join(work, f"server_{fmt}.log"),
                                        args.server_timeout)
            t = temperature if fmt == "merged" else 1.0
            checks.append(compare(f"{fmt}, server /classify" + (" + client temperature" if fmt == "merged" else ""),
                                  [calibrated(p, t) for p in served], expected, args.atol))
        if not args.no_predict:
            checks += predict_engine_checks(args.vllm_python, work, exports, base, lora, test_file, args.atol)
        if not args.no_readme:
            print("the README's vLLM snippet, as written ...", flush=True)
            checks += readme_snippet_checks(args.vllm_python, work, exports, base, lora, args.atol)
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            print(f"vllm check: FAIL (a step did not run; work folder {work})")
            return 1
        raise
    finally:
        if args.work_dir is None and "checks" in locals() and all(ok for ok, _ in checks):
            shutil.rmtree(work, ignore_errors=True)
    for _, line in checks:
        print(line)
    for line in lines:
        print(line)
    passed = all(ok for ok, _ in checks)
    version = subprocess.run([args.vllm_python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                             text=True, env=vllm_env()).stdout.strip().splitlines()[-1:] or ["?"]
    print(f"vllm check: {'PASS' if passed else 'FAIL'} ({len(checks)} checks, {len(expected)} pairs, fp32, "
          f"atol {args.atol:g}; vLLM {version[0]}){'' if passed else f'; work folder {work}'}")
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
