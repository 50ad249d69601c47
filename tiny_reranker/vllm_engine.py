"""vLLM as a second scoring engine, driven from this venv: ``scripts/vllm_classify.py --repeat`` in a vLLM venv.

vLLM's builds pin their own torch and transformers, so it never runs in this process: :class:`VllmProcess`
starts the engine once in the venv's python, then asks it for one ``classify`` over the same prompts per
:meth:`~VllmProcess.run`, which returns vLLM's own timing of that call and its probabilities (serving.json's
client temperature applied). bench.py interleaves it with ``Reranker.predict_probs``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "vllm_classify.py")
VLLM_DTYPES = {"torch.float32": "float32", "torch.bfloat16": "bfloat16", "torch.float16": "float16"}


def vllm_env(threads: int | None = None) -> dict:
    """The environment vLLM's CPU build needs here: 1 GiB of KV cache (its default, a fraction of all memory,
    is refused on 24 GB), no hub, and ``threads`` OpenMP threads bound to cores 0..threads-1 (as many as ours)."""
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if threads:
        env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{threads - 1}"
    return env


class VllmProcess:
    """One vLLM engine on ``folder`` (an export with serving.json), kept warm over ``prompts_file``'s prompts."""

    def __init__(self, python: str, folder: str, prompts_file: str, dtype: str, log: str, threads: int | None = None,
                 max_model_len: int = 1024):
        self._log = open(log, "w")
        self.proc = subprocess.Popen(
            [python, SCRIPT, "--model", folder, "--prompts", prompts_file, "--dtype", VLLM_DTYPES.get(dtype, dtype),
             "--max_model_len", str(max_model_len), "--repeat"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True, env=vllm_env(threads))
        self.log = log
        try:
            self.startup_seconds = self._reply()["startup_seconds"]
        except RuntimeError:
            self._log.close()
            raise

    def _reply(self) -> dict:
        for line in self.proc.stdout:  # the engine may print other lines; ours are JSON objects
            if line.startswith("{"):
                return json.loads(line)
        code = self.proc.wait()
        self._log.flush()
        with open(self.log, errors="replace") as f:
            lines = [ln.rstrip() for ln in f if ln.strip()]
        tail = " | ".join(lines[-3:])
        raise RuntimeError(f"the vLLM engine exited ({code}) without answering; the end of its log: {tail}")

    def run(self, prompts_file: str | None = None) -> dict:
        """One ``classify`` over ``prompts_file``'s prompts (default: the first ones):
        ``{"seconds": s, "probs": [[p_E, p_S, p_C, p_I], ...]}``."""
        self.proc.stdin.write(f"{prompts_file or ''}\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()


class VllmScorer:
    """``predict.py --engine vllm``: pairs tokenized here exactly as :class:`~tiny_reranker.reranker.Reranker`
    tokenizes them (template, truncation), scored by one vLLM engine on an export folder (``export.py``'s
    merged or seq_cls, with its serving.json). It has Reranker's surface predict.py uses: ``predict_logits``,
    ``temperature``, ``encoder``; ``close()`` stops the engine.

    vLLM returns ``softmax`` of the served head; ``log`` of it is the head's logits up to a per-row shift, which
    the softmax ignores, so ``softmax(log(p) / temperature)`` gives eval.py's probabilities: for merged,
    ``temperature`` is serving.json's client temperature; for seq_cls it is 1 (folded in), and with
    ``no_temperature`` it is ``1 / T_folded``, which undoes the fold."""

    def __init__(self, python: str, folder: str, max_length: int, dtype: str, no_temperature: bool = False):
        import tempfile

        from esci_dataset import PromptEncoder
        from tiny_reranker.contract import PROMPT_FILE, stored_template
        from tiny_reranker.io import read_json_object
        from tiny_reranker.modeling import load_tokenizer
        from tiny_reranker.serving import SERVING_FILE

        serving = read_json_object(os.path.join(folder, SERVING_FILE))
        if serving.get("format") == "seq_cls":
            folded = read_json_object(os.path.join(folder, PROMPT_FILE)).get("temperature_folded_into_score_weight")
            self.temperature = 1.0 / folded if no_temperature and folded else 1.0
        else:
            self.temperature = 1.0 if no_temperature else float(serving.get("client_temperature") or 1.0)
        self.encoder = PromptEncoder(load_tokenizer(folder), max_length, stored_template(folder))
        self._dir = tempfile.mkdtemp(prefix="tiny-reranker-vllm-")
        first = os.path.join(self._dir, "prompts.json")
        with open(first, "w") as f:
            json.dump([], f)
        self.log = os.path.join(self._dir, "vllm.log")
        try:
            self.engine = VllmProcess(python, folder, first, dtype, self.log, max_model_len=max_length)
        except RuntimeError:  # the error quotes the log's end: the temp folder goes with the failed start
            shutil.rmtree(self._dir, ignore_errors=True)
            raise

    def predict_logits(self, queries, items):
        """``[N, 4]`` float64 label logits up to a per-row constant (see the class docstring), in input order."""
        import numpy as np

        path = os.path.join(self._dir, "prompts.json")
        with open(path, "w") as f:  # token ids, so vLLM scores exactly our prompts
            json.dump([list(map(int, ids)) for ids in self.encoder.encode_batch(list(queries), list(items))], f)
        probs = np.asarray(self.engine.run(path)["raw_probs"], dtype=np.float64).reshape(-1, 4)
        return np.log(np.maximum(probs, np.finfo(np.float64).tiny))

    def close(self) -> None:
        self.engine.close()
        shutil.rmtree(self._dir, ignore_errors=True)
