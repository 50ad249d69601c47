"""What a trained adapter, a checkpoint and an export promise about themselves, read and written in one place.

* ``reranker_config.json`` (next to every adapter, checkpoint and export): the labels, their token
  ids, the exact prompt template and the calibration temperature. Scoring reads the prompt and
  temperature from it, and refuses label or prompt drift.
* ``run_config.json`` (training folders and checkpoints): every train.py flag, so a resume under other
  model flags is refused (``checkpoints.check_resume_matches``).
* ``reranker_prompt.json`` (exports): the prompt and score for clients that do not import this package.
* ``README.md``: a short model card in place of peft's placeholder.

Every file is written atomically as strict JSON (:mod:`tiny_reranker.io`).
"""

from __future__ import annotations

import logging
import numbers
import os

from esci_dataset import (
    DEFAULT_TEMPLATE,
    INSTRUCT,
    LABELS,
    NDCG_GAINS,
    PROMPT_VERSION,
    SCORE_WEIGHTS,
    TEMPLATES_BY_VERSION,
    ESCIDataError,
    PromptTemplate,
    label_token_ids,
    label_words,
)
from tiny_reranker.calibration import TEMPERATURE_RANGE
from tiny_reranker.io import read_json_object, write_json, write_text

logger = logging.getLogger(__name__)

LABEL_CONFIG_NAME = "reranker_config.json"
RUN_CONFIG_NAME = "run_config.json"
PROMPT_FILE = "reranker_prompt.json"
MODEL_CARD_NAME = "README.md"


# Why a stored temperature is applied by default: it never changes the predicted label (the argmax), so
# tasks 2 and 3 are untouched; it makes the probabilities mean what they say, and the ranking score is an
# expected gain *under those probabilities*, so it is the calibrated score that estimates what its formula
# claims. It can reorder items by score: eval.py reports nDCG with and without it, and --no_temperature
# (eval.py, predict.py) or Reranker(temperature=1.0) scores the raw logits.
TEMPERATURE_NOTE = ("the four label logits are divided by this before the softmax; fitted on the held-out split by "
                    "train.py (by default; --no_calibrate skips it). It never changes the predicted label but can reorder items by score; "
                    "eval.py / predict.py --no_temperature score the raw logits. null: none fitted")


def reranker_config(tokenizer, base_model: str, template: PromptTemplate = DEFAULT_TEMPLATE,
                    instruction: str | None = None, temperature: float | None = None) -> dict:
    """What an adapter was trained with: labels, their token ids, the exact prompt template, and the
    calibration temperature (None when none was fitted)."""
    return {
        "prompt_version": PROMPT_VERSION,
        "labels": list(LABELS),
        "label_words": label_words(tokenizer),
        "label_token_ids": label_token_ids(tokenizer),
        "base_model": base_model,
        "instruction": instruction or INSTRUCT,
        "prompt_template": template.to_dict(),
        "temperature": None if temperature is None else float(temperature),
        "temperature_note": TEMPERATURE_NOTE,
    }


def save_reranker_config(output_dir: str, tokenizer, base_model: str, template: PromptTemplate = DEFAULT_TEMPLATE,
                         instruction: str | None = None, temperature: float | None = None,
                         extra: dict | None = None) -> None:
    """Write :func:`reranker_config` (plus ``extra`` keys, e.g. an export's notes) as ``reranker_config.json``."""
    config = reranker_config(tokenizer, base_model, template, instruction, temperature)
    write_json(os.path.join(output_dir, LABEL_CONFIG_NAME), {**config, **(extra or {})})


def read_reranker_config(model_dir: str) -> dict | None:
    """``reranker_config.json`` of ``model_dir`` (None when there is none); a corrupt one is an ESCIDataError."""
    path = os.path.join(model_dir, LABEL_CONFIG_NAME)
    return read_json_object(path) if os.path.exists(path) else None


def check_reranker_config(model_dir: str, tokenizer, base_model: str | None = None) -> dict | None:
    """Read ``reranker_config.json`` from ``model_dir`` and refuse label or prompt drift (ESCIDataError)."""
    path = os.path.join(model_dir, LABEL_CONFIG_NAME)
    saved = read_reranker_config(model_dir)
    if saved is None:
        logger.warning("%s has no %s; assuming the current prompt and labels", model_dir, LABEL_CONFIG_NAME)
        return None
    if base_model is not None and saved.get("base_model") and os.path.basename(os.path.normpath(saved["base_model"])) \
            != os.path.basename(os.path.normpath(base_model)):
        logger.warning("%s was trained on %s but is being loaded on %s: scores are only meaningful on the same base",
                       model_dir, saved["base_model"], base_model)
    current = reranker_config(tokenizer, saved.get("base_model", ""))
    for key in ("labels", "label_token_ids"):
        if saved.get(key) != current[key]:
            raise ESCIDataError(f"{path}: {key} is {saved.get(key)!r} but this code and tokenizer give {current[key]!r}; "
                                "the adapter was trained with other labels or another tokenizer")
    template_from_config(saved, path)  # a known prompt, or one stored with the adapter
    temperature_from_config(saved, path)
    return saved


def template_from_config(saved: dict | None, source: str = LABEL_CONFIG_NAME) -> PromptTemplate:
    """The prompt an adapter was trained with: its stored template, else its version's, else today's default."""
    if saved is None:
        return DEFAULT_TEMPLATE
    if "prompt_template" in saved:
        return PromptTemplate.from_dict(saved["prompt_template"], f"{source}: prompt_template")
    version = saved.get("prompt_version")
    if version not in TEMPLATES_BY_VERSION:
        raise ESCIDataError(f"{source}: prompt_version {version!r} stores no template and is unknown to this code "
                            f"(known: {', '.join(TEMPLATES_BY_VERSION)}); the adapter was trained with a different prompt")
    return TEMPLATES_BY_VERSION[version]


def temperature_from_config(saved: dict | None, source: str = LABEL_CONFIG_NAME) -> float | None:
    """The calibration temperature stored with an adapter or merged export; None when there is none (null or
    no key). Anything else is checked by :func:`check_temperature`, naming ``source``."""
    value = (saved or {}).get("temperature")
    return None if value is None else check_temperature(value, f"{source}: temperature")


def check_temperature(value, what: str = "temperature") -> float:
    """``value`` as a float, or an :class:`ESCIDataError` (a ValueError) naming ``what``.

    Scoring divides the four label logits by it before the softmax, so it must be a number inside
    ``calibration.TEMPERATURE_RANGE``, where train.py fits it: a T of 1e-320 passes ``0 < T < inf`` and
    then overflows every logit to inf, and 1e308 turns every probability into 0.25.
    """
    low, high = TEMPERATURE_RANGE
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not low <= float(value) <= high:
        raise ESCIDataError(f"{what} must be a positive number in [{low:g}, {high:g}] (the range train.py "
                            f"fits it in), or null for none, got {value!r}")
    return float(value)


def stored_template(base_model: str, lora_model: str | None = None) -> PromptTemplate:
    """The prompt the adapter (or a merged export) was trained with, from its ``reranker_config.json``.

    An adapter that stores no template gets its prompt version's template; a
    folder without the file gets today's default.
    """
    folder = os.path.expanduser(lora_model or base_model)
    saved = read_reranker_config(folder) if os.path.isdir(folder) else None
    return template_from_config(saved, os.path.join(folder, LABEL_CONFIG_NAME))


def stored_temperature(base_model: str, lora_model: str | None = None) -> float | None:
    """The calibration temperature in the adapter's (or a merged export's) ``reranker_config.json``, or None."""
    folder = os.path.expanduser(lora_model or base_model)
    saved = read_reranker_config(folder) if os.path.isdir(folder) else None
    return temperature_from_config(saved, os.path.join(folder, LABEL_CONFIG_NAME))


def save_run_contract(folder: str, tokenizer, template: PromptTemplate, run_config: dict,
                      temperature: float | None = None) -> None:
    """The label/prompt contract (with the exact template and any fitted temperature), the run's flags
    (``run_config``: train.py's flags and world size) and the model card."""
    save_reranker_config(folder, tokenizer, run_config["base_model"], template, run_config.get("instruction"),
                         temperature)
    write_json(os.path.join(folder, RUN_CONFIG_NAME), run_config)
    write_model_card(folder, run_config)


MODEL_CARD_TITLE = "# ESCI reranker adapter (tiny-reranker)"


def is_model_card(path: str) -> bool:
    """Whether the file at ``path`` is a card :func:`write_model_card` wrote (a user's own README.md is not)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        head = f.read(2000)
    # peft's placeholder card, which save_pretrained writes just before ours, counts as ours
    return head.startswith(MODEL_CARD_TITLE) or (head.startswith("---") and "library_name: peft" in head)


def write_model_card(folder: str, run_config: dict) -> None:
    """A short README.md of our own in place of peft's placeholder card ("[More Information Needed]")."""
    card = (f"{MODEL_CARD_TITLE}\n\nA LoRA adapter on `{run_config['base_model']}` that scores a "
            "(query, product) pair as E exact / S substitute / C complement / I irrelevant, and ranks by\n"
            "`score = (3·P(E) + 2·P(S) + 1·P(C)) / 3`.\n\nTrained by `train.py` on "
            f"`{run_config['train_file']}`; every flag is in `run_config.json`, the prompt and label ids in "
            "`reranker_config.json`, metrics in `train_metrics.json`.\n\n```bash\n"
            f"python eval.py --base_model {run_config['base_model']} --lora_model <this folder> --eval_file test.parquet\n```\n")
    write_text(os.path.join(folder, MODEL_CARD_NAME), card)


def prompt_template(template: PromptTemplate) -> str:
    """The full prompt with ``{query}`` and ``{document}`` slots, ready for ``str.format`` (literal braces escaped)."""
    escape = lambda text: text.replace("{", "{{").replace("}", "}}")  # noqa: E731
    return escape(template.head) + " {query}" + escape(template.middle) + " {document}" + escape(template.tail)


def prompt_spec(tokenizer, label_ids: list[int], template: PromptTemplate, instruction: str | None,
                temperature: float = 1.0) -> dict:
    """Everything a client needs to build the exact prompt and turn the four outputs into a score.

    ``temperature``: what the client divides the four outputs by before the softmax (1.0 when none
    was fitted, or when it is already folded into the weights).
    """
    return {
        "prompt_version": PROMPT_VERSION,
        "template": prompt_template(template),
        "prefix": template.head,
        "suffix": template.tail,
        "instruction": instruction,
        "labels": list(LABELS),
        "label_words": label_words(tokenizer),
        "label_token_ids": label_ids,
        "score_weights": [SCORE_WEIGHTS[label] for label in LABELS],
        "temperature": temperature,
        "score": "sum(score_weights * p) / 3 = (3*p_E + 2*p_S + 1*p_C + 0*p_I) / 3, p = softmax(outputs / temperature) "
                 "over the 4 outputs",
        "expected_gain_weights": [NDCG_GAINS[label] for label in LABELS],
        "rank_by": {"score": "the default ranking: weights S and C high (3:2:1)",
                    "expected_gain": "sum(expected_gain_weights * p) = p_E + 0.1*p_S + 0.01*p_C: ESCI's nDCG gains; "
                                     "maximises the expected nDCG when p is calibrated (apply the temperature)"},
        "notes": "prompt = template.format(query=query, document=item_text); the tokenizer adds no special "
                 "tokens. Read the output at the LAST prompt token. Training truncated only the document "
                 "to fit max_length; engines do not, so cut long item texts before sending them.",
    }
