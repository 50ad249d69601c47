"""Classify rendered prompts with vLLM's offline API, as an export's serving.json says. Runs in a vLLM venv.

    VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python scripts/vllm_classify.py --model export/seq_cls \
        --prompts prompts.json --output probs.json

--prompts: a JSON list of prompts, each ``template.format(query=..., document=...)`` from the folder's
reranker_prompt.json, or a list of token-id lists (predict.py --engine vllm sends its own tokenization). --output: ``{"probs": [[p_E, p_S, p_C, p_I], ...], "raw_probs": [...],
"startup_seconds": s, "seconds": s}``; ``probs`` have serving.json's ``client_temperature`` applied, so they
are comparable with eval.py's. With --repeat, after start-up the script reads one line from stdin per run (the
path of another prompts file, or an empty line for the same prompts) and answers each with one such JSON line
(bench.py interleaves its sides through it).

It imports nothing of this repo but ``tiny_reranker/serving.py``, by its file (stdlib only), so the vLLM venv
needs no more than vLLM: its transformers (< 5.20) is not ours.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def load_serving_module():
    """``tiny_reranker/serving.py`` by its path: importing the package would pull in the rest of the project."""
    spec = importlib.util.spec_from_file_location("serving", os.path.join(HERE, "..", "tiny_reranker", "serving.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=str, required=True, help="an export folder written by export.py (with serving.json)")
    p.add_argument("--prompts", type=str, required=True, help="JSON file: a list of rendered prompts")
    p.add_argument("--output", type=str, default=None, help="JSON file to write the probabilities to")
    p.add_argument("--dtype", type=str, default="float32", help="vLLM's --dtype (compare paths at the same dtype)")
    p.add_argument("--max_model_len", type=int, default=1024, help="longest prompt in tokens vLLM plans for")
    p.add_argument("--repeat", action="store_true", help="after start-up, classify once per line read from stdin")
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    serving = load_serving_module()
    with open(os.path.join(args.model, serving.SERVING_FILE)) as f:
        spec = json.load(f)
    with open(args.prompts) as f:
        prompts = json.load(f)

    from vllm import LLM  # the engine starts in a spawned process: this file runs only under __main__

    start = time.perf_counter()
    llm = LLM(model=args.model, runner=spec["runner"], hf_overrides=spec["hf_overrides"] or None, dtype=args.dtype,
              max_model_len=args.max_model_len, enforce_eager=False)
    startup = time.perf_counter() - start

    def classify(prompts: list) -> dict:
        start = time.perf_counter()
        inputs = [{"prompt_token_ids": p} if isinstance(p, list) else p for p in prompts]  # token ids or text
        raw = [list(map(float, out.outputs.probs)) for out in llm.classify(inputs, use_tqdm=False)] if inputs else []
        seconds = time.perf_counter() - start
        return {"probs": [serving.calibrated(p, spec["client_temperature"]) for p in raw], "raw_probs": raw,
                "seconds": seconds}

    if args.repeat:
        print(json.dumps({"startup_seconds": startup}), flush=True)
        for line in sys.stdin:  # a line: the path of another prompts file, or empty for --prompts again
            if line.strip():
                with open(line.strip()) as f:
                    prompts = json.load(f)
            print(json.dumps(classify(prompts)), flush=True)
        return 0
    result = {**classify(prompts), "startup_seconds": startup}
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f)
    else:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
