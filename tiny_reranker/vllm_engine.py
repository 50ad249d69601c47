"""vLLM as a second scoring engine, driven from this venv: ``scripts/vllm_classify.py --repeat`` in a vLLM venv.

vLLM's builds pin their own torch and transformers, so it never runs in this process: :class:`VllmProcess`
starts the engine once in the venv's python, then asks it for one ``classify`` over the same prompts per
:meth:`~VllmProcess.run`, which returns vLLM's own timing of that call and its probabilities (serving.json's
client temperature applied). bench.py interleaves it with ``Reranker.predict_probs``.
"""

from __future__ import annotations

import json
import os
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
        self.startup_seconds = self._reply()["startup_seconds"]

    def _reply(self) -> dict:
        for line in self.proc.stdout:  # the engine may print other lines; ours are JSON objects
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"vLLM exited ({self.proc.wait()}) without answering; see {self.log}")

    def run(self) -> dict:
        """One ``classify`` over all prompts: ``{"seconds": s, "probs": [[p_E, p_S, p_C, p_I], ...]}``."""
        self.proc.stdin.write("go\n")
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
