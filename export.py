"""Export a trained LoRA reranker as a standalone model that loads with plain transformers (no peft).

  --format merged    Qwen3ForCausalLM with the LoRA merged into its weights and the full lm_head.
                     Score as in training: last-position logits at the four label-token ids
                     (reranker_config.json), softmax. predict.py / Reranker load it as --base_model.
  --format seq_cls   Qwen3ForSequenceClassification, num_labels=4, id2label {0:E, 1:S, 2:C, 3:I}. Its
                     `score` head is the four label rows of the merged output embedding, so its
                     softmax equals ours. This is what last-token-pooling engines (vLLM /classify,
                     TEI) serve. The prompt to send is in reranker_prompt.json. transformers pools at
                     the last non-pad token, so right and left padding both work; engines run each
                     prompt unpadded, so padding and position ids do not arise there.

    python export.py --base_model Qwen/Qwen3-0.6B --lora_model outputs/lora --output_dir export/seq_cls --format seq_cls

Both folders also hold the tokenizer, reranker_config.json and reranker_prompt.json. The
merge runs in float32 on the CPU; --bf16 only casts the saved weights. The folder appears
complete or not at all (written to a temp folder, then renamed).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import uuid

import torch

from esci_dataset import (
    INSTRUCT,
    LABEL_GAIN,
    LABELS,
    PROMPT_PREFIX,
    PROMPT_SUFFIX,
    PROMPT_VERSION,
    ESCIDataError,
    format_instruction,
    label_words,
    prompt_pieces,
)
from modeling import detach_label_head, save_reranker_config
from reranker import check_model_paths, load_reranker

logger = logging.getLogger("export")

PROMPT_FILE = "reranker_prompt.json"
FORMATS = ("merged", "seq_cls")


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--base_model", type=str, required=True, help="the base causal LM the adapter was trained on (folder or hub id)")
    p.add_argument("--lora_model", type=str, required=True, help="LoRA adapter folder written by train.py")
    p.add_argument("--output_dir", type=str, required=True, help="folder to create for the exported model")
    p.add_argument("--format", type=str, required=True, choices=FORMATS,
                   help="merged: standalone causal LM; seq_cls: 4-label sequence classifier for serving engines")
    p.add_argument("--bf16", action="store_true", help="save the weights in bfloat16 (half the size; the merge itself is float32)")
    p.add_argument("--overwrite", action="store_true", help="replace --output_dir if it already exists and is not empty")
    return p


# ---------------------------------------------------------------------------
# The prompt, written down for code that does not import esci_dataset
# ---------------------------------------------------------------------------
def prompt_template() -> str:
    """The full prompt with ``{query}`` and ``{document}`` slots, ready for ``str.format`` (literal braces escaped)."""
    head, middle, tail = prompt_pieces()
    escape = lambda text: text.replace("{", "{{").replace("}", "}}")  # noqa: E731
    return escape(head) + " {query}" + escape(middle) + " {document}" + escape(tail)


def prompt_spec(tokenizer, label_ids: list[int]) -> dict:
    """Everything a client needs to build the exact prompt and turn the four outputs into a score."""
    return {
        "prompt_version": PROMPT_VERSION,
        "template": prompt_template(),
        "prefix": PROMPT_PREFIX,
        "suffix": PROMPT_SUFFIX,
        "instruction": INSTRUCT,
        "user_template": format_instruction("{instruction}", "{query}", "{document}"),
        "labels": list(LABELS),
        "label_words": label_words(tokenizer),
        "label_token_ids": label_ids,
        "label_gain": [LABEL_GAIN[label] for label in LABELS],
        "score": "sum(gain * p) / 3 = (3*p_E + 2*p_S + 1*p_C + 0*p_I) / 3, p = softmax over the 4 outputs",
        "notes": "prompt = template.format(query=query, document=item_text); the tokenizer adds no special "
                 "tokens. Read the output at the LAST prompt token. Training truncated only the document "
                 "to fit max_length; engines do not, so cut long item texts before sending them.",
    }


# ---------------------------------------------------------------------------
# Building the two formats
# ---------------------------------------------------------------------------
def merged_causal_lm(base_model: str, lora_model: str):
    """LoRA merged into float32 base weights, real lm_head restored. Returns ``(model, tokenizer, label_ids)``."""
    model, tokenizer = load_reranker(base_model, lora_model, torch.float32, no_flash_attn=True, device="cpu")
    model = model.merge_and_unload()
    label_ids = model.get_output_embeddings().label_ids.tolist()
    detach_label_head(model)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, label_ids


@torch.no_grad()
def seq_cls_from_causal_lm(causal_lm, label_ids: list[int], pad_token_id: int):
    """A ``*ForSequenceClassification`` sharing ``causal_lm``'s body; ``score.weight [4, H]`` = label rows.

    transformers pools at the rightmost token that is not ``pad_token_id``
    (``GenericForSequenceClassification``), so ``pad_token_id`` must be the
    tokenizer's pad id; our prompts always end in the template suffix, never in it.
    """
    from transformers import AutoModelForSequenceClassification

    config = causal_lm.config.__class__.from_dict(causal_lm.config.to_dict())
    config.architectures = [causal_lm.__class__.__name__.replace("ForCausalLM", "ForSequenceClassification")]
    config.num_labels = len(LABELS)
    config.id2label = dict(enumerate(LABELS))
    config.label2id = {label: i for i, label in enumerate(LABELS)}
    config.problem_type = "single_label_classification"
    config.pad_token_id = pad_token_id
    config.use_sep_token = False  # vLLM's score API: concatenate query and document without a separator
    seq_cls = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    body = seq_cls.base_model  # the shared decoder (``model.``)
    missing, unexpected = body.load_state_dict(causal_lm.base_model.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"decoder weights do not line up: missing {missing}, unexpected {unexpected}")
    # A separate [4, H] copy: the classifier is not tied to the input embedding.
    seq_cls.score.weight.copy_(causal_lm.get_output_embeddings().weight[label_ids].float())
    return seq_cls.eval()


def save_export(model, tokenizer, label_ids: list[int], base_model: str, folder: str, bf16: bool) -> None:
    if bf16:
        model.to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    save_reranker_config(folder, tokenizer, base_model)
    with open(os.path.join(folder, PROMPT_FILE), "w") as f:
        json.dump(prompt_spec(tokenizer, label_ids), f, indent=2, ensure_ascii=False)


def publish(tmp_dir: str, output_dir: str) -> None:
    """Move the finished temp folder onto ``output_dir`` (replacing an old one)."""
    if os.path.isdir(output_dir):
        shutil.rmtree(output_dir)
    os.rename(tmp_dir, output_dir)


def check_output_dir(output_dir: str, overwrite: bool) -> None:
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ESCIDataError(f"--output_dir {output_dir}: exists and is not a folder")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise ESCIDataError(f"--output_dir {output_dir}: exists and is not empty; pass --overwrite to replace it")


def main(argv: list[str] | None = None) -> int:
    # 1. Arguments and checks ----------------------------------------------------
    args = make_parser().parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO, stream=sys.stderr)
    logger.info("arguments: %s", json.dumps(vars(args), sort_keys=True))
    try:
        check_model_paths(args.base_model, args.lora_model)
        check_output_dir(args.output_dir, args.overwrite)
        # 2. Merge the adapter into the base weights --------------------------------
        causal_lm, tokenizer, label_ids = merged_causal_lm(args.base_model, args.lora_model)
    except ESCIDataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:  # unloadable model, or an adapter trained with another prompt
        print(f"error: cannot load --base_model {args.base_model} with --lora_model {args.lora_model}: {exc}",
              file=sys.stderr)
        return 2

    # 3. Build the requested format ------------------------------------------------
    model = causal_lm if args.format == "merged" else seq_cls_from_causal_lm(causal_lm, label_ids, tokenizer.pad_token_id)

    # 4. Save into a temp folder next to the target, then rename --------------------
    parent = os.path.dirname(os.path.abspath(args.output_dir))
    os.makedirs(parent, exist_ok=True)
    tmp_dir = os.path.join(parent, f".{os.path.basename(os.path.abspath(args.output_dir))}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        save_export(model, tokenizer, label_ids, args.base_model, tmp_dir, args.bf16)
        publish(tmp_dir, args.output_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    logger.info("exported %s (%s) to %s", type(model).__name__, args.format, args.output_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
