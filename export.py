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

Both folders also hold the tokenizer, reranker_config.json, reranker_prompt.json and serving.json (how to
serve the folder with vLLM: runner, hf_overrides for merged, the temperature the client applies). The
merge runs in float32 on the CPU; --bf16 only casts the saved weights. The folder appears
complete or not at all (written to a temp folder, then renamed).

A temperature T stored with the adapter (train.py fits one by default) comes along, so an export scores
like eval.py and predict.py: seq_cls folds it into the head (score.weight / T: its logits are
the raw ones / T, exactly, so engines need plain softmax); merged keeps the raw lm_head and stores
T in reranker_config.json and reranker_prompt.json ("temperature": divide the four label logits
by it), which Reranker / predict.py apply when they load the folder.

--output_dir may not be, sit inside, or contain --lora_model or --base_model. --overwrite
replaces only an earlier export (a folder with reranker_prompt.json and no adapter or
subfolders) and logs what it removed; any other non-empty folder is refused.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import uuid

import torch

from esci_dataset import LABELS, ESCIDataError
from tiny_reranker.cli import (
    ArgumentParser,
    HelpFormatter,
    check_output_dir,
    cli_error,
    folder_relation,
    is_model_file_name,
    set_up_logging,
)
from tiny_reranker.contract import (
    PROMPT_FILE,
    prompt_spec,
    read_reranker_config,
    save_reranker_config,
    stored_temperature,
    stored_template,
)
from tiny_reranker.io import write_json
from tiny_reranker.model_files import check_model_paths
from tiny_reranker.modeling import detach_label_head, load_reranker
from tiny_reranker.serving import SERVING_FILE, serving_spec

logger = logging.getLogger("export")

FORMATS = ("merged", "seq_cls")


def make_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter, allow_abbrev=False)
    p.add_argument("--base_model", type=str, required=True, help="the base causal LM the adapter was trained on (folder or hub id)")
    p.add_argument("--lora_model", type=str, required=True, help="LoRA adapter folder written by train.py")
    p.add_argument("--output_dir", type=str, required=True, help="folder to create for the exported model")
    p.add_argument("--format", type=str, required=True, choices=FORMATS,
                   help="merged: standalone causal LM; seq_cls: 4-label sequence classifier for serving engines")
    p.add_argument("--bf16", action="store_true", help="save the weights in bfloat16 (half the size; the merge itself is float32)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --output_dir if it holds an earlier export; other non-empty folders are never replaced")
    return p


# ---------------------------------------------------------------------------
# Building the two formats
# ---------------------------------------------------------------------------
def merged_causal_lm(base_model: str, lora_model: str):
    """LoRA merged into float32 base weights, real lm_head restored. Returns ``(model, tokenizer, label_ids)``."""
    model, tokenizer = load_reranker(base_model, lora_model, torch.float32, no_flash_attn=True, device="cpu")  # merged
    label_ids = model.get_output_embeddings().label_ids.tolist()
    detach_label_head(model)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, label_ids


@torch.no_grad()
def seq_cls_from_causal_lm(causal_lm, label_ids: list[int], pad_token_id: int, temperature: float = 1.0):
    """A ``*ForSequenceClassification`` sharing ``causal_lm``'s body; ``score.weight [4, H]`` = label rows / T.

    The logits are linear in ``score.weight`` (no bias), so dividing it by the calibration
    ``temperature`` gives exactly the raw logits / T: engines serve calibrated probabilities.

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
    seq_cls.score.weight.copy_(causal_lm.get_output_embeddings().weight[label_ids].float() / temperature)
    return seq_cls.eval()


def save_export(model, tokenizer, label_ids: list[int], base_model: str, lora_model: str, folder: str, bf16: bool,
                temperature: float | None = None, folded: bool = False, served_as: str | None = None) -> None:
    """Weights, tokenizer, the adapter's own prompt (its stored template) and its temperature, so the export
    scores as the adapter does, and how to serve it with vLLM (``serving.json``). ``folded``: the temperature
    is already in the weights (seq_cls). ``served_as``: the path serving.json's commands name (the final folder,
    not the temp one ``folder`` may be)."""
    if bf16:
        model.to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    template = stored_template(base_model, lora_model)
    instruction = (read_reranker_config(lora_model) or {}).get("instruction")
    # "temperature" is always what to divide THIS folder's outputs by: nothing is left to apply once folded.
    to_apply = None if folded else temperature
    extra = {"temperature_folded_into_score_weight": temperature} if folded and temperature is not None else {}
    save_reranker_config(folder, tokenizer, base_model, template, instruction, to_apply, extra)
    write_json(os.path.join(folder, PROMPT_FILE),
               {**prompt_spec(tokenizer, label_ids, template, instruction, to_apply or 1.0), **extra})
    fmt = "seq_cls" if folded or "ForSequenceClassification" in type(model).__name__ else "merged"
    write_json(os.path.join(folder, SERVING_FILE),
               serving_spec(fmt, served_as or folder, type(model).__name__, tokenizer.convert_ids_to_tokens(label_ids),
                            to_apply))


def publish(tmp_dir: str, output_dir: str) -> list[str]:
    """Move the finished temp folder onto ``output_dir``; returns the names removed from an old one there.

    The old folder is renamed aside first and deleted last, so ``output_dir`` is never half gone.
    """
    removed, old = [], None
    if os.path.isdir(output_dir):
        removed = sorted(os.listdir(output_dir))
        old = f"{tmp_dir}.old"
        os.rename(output_dir, old)
    os.rename(tmp_dir, output_dir)
    if old:
        shutil.rmtree(old, ignore_errors=True)
    return removed


# ---------------------------------------------------------------------------
# --output_dir: never an input, only ever an earlier export when replaced
# ---------------------------------------------------------------------------
def check_apart_from_inputs(output_dir: str, inputs: dict[str, str]) -> None:
    """``output_dir`` is not, is not inside, and does not contain any input folder (links resolved).

    ``inputs``: flag -> path; hub ids (no such local folder) are skipped.
    """
    for flag, path in inputs.items():
        if not path or not os.path.isdir(os.path.expanduser(path)):
            continue
        if (relation := folder_relation(output_dir, path)):
            raise ESCIDataError(f"--output_dir {output_dir} {relation} the {flag} folder {path}; the export would "
                                f"{'mix with' if relation == 'is inside' else 'replace'} its input. Export to a separate folder")


def looks_like_export(folder: str) -> bool:
    """A folder this script wrote: its prompt file and a model config, only model files, no adapter, no subfolders."""
    names = os.listdir(folder)
    return (PROMPT_FILE in names and "config.json" in names and "adapter_config.json" not in names
            and not any(os.path.isdir(os.path.join(folder, n)) for n in names)
            and all(is_model_file_name(n) for n in names))  # a file of the user's in it is never deleted


def check_export_target(output_dir: str, overwrite: bool) -> None:
    """``output_dir`` (or its parent, where the temp folder goes) is writable; a non-empty one is an old export."""
    check_output_dir(output_dir, "--output_dir")
    check_output_dir(os.path.dirname(os.path.abspath(output_dir)), "--output_dir")
    if not os.path.isdir(output_dir) or not os.listdir(output_dir):
        return
    if not overwrite:
        raise ESCIDataError(f"--output_dir {output_dir}: exists and is not empty; pass --overwrite to replace an "
                            "earlier export there")
    if not looks_like_export(output_dir):
        raise ESCIDataError(f"--output_dir {output_dir}: exists and is not an earlier export (no {PROMPT_FILE}, or it "
                            "holds an adapter or subfolders), so --overwrite will not delete it; choose a new folder")


def main(argv: list[str] | None = None) -> int:
    # 1. Arguments and checks ----------------------------------------------------
    args = make_parser().parse_args(argv)
    set_up_logging(logger, args)
    try:
        # Where we would write comes first: an export must never touch its own inputs, whatever state they are in.
        check_apart_from_inputs(args.output_dir, {"--lora_model": args.lora_model, "--base_model": args.base_model})
        check_export_target(args.output_dir, args.overwrite)
        check_model_paths(args.base_model, args.lora_model)
        # 2. Merge the adapter into the base weights --------------------------------
        temperature = stored_temperature(args.base_model, args.lora_model)
        causal_lm, tokenizer, label_ids = merged_causal_lm(args.base_model, args.lora_model)
    except ESCIDataError as exc:
        return cli_error(exc)
    except (OSError, ValueError) as exc:  # unloadable model, or an adapter trained with another prompt
        return cli_error(f"cannot load --base_model {args.base_model} with --lora_model {args.lora_model}: {exc}")

    # 3. Build the requested format (seq_cls: the temperature folded into its head) ------
    folded = args.format == "seq_cls"
    model = seq_cls_from_causal_lm(causal_lm, label_ids, tokenizer.pad_token_id, temperature or 1.0) if folded \
        else causal_lm

    # 4. Save into a temp folder next to the target, then rename --------------------
    parent = os.path.dirname(os.path.abspath(args.output_dir))
    tmp_dir = os.path.join(parent, f".{os.path.basename(os.path.abspath(args.output_dir))}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        os.makedirs(parent, exist_ok=True)
        save_export(model, tokenizer, label_ids, args.base_model, args.lora_model, tmp_dir, args.bf16, temperature, folded,
                    served_as=args.output_dir)
        removed = publish(tmp_dir, args.output_dir)
    except OSError as exc:  # e.g. a full disk: the old folder, if any, is untouched
        return cli_error(f"--output_dir {args.output_dir}: writing the export failed ({exc.strerror or exc}); "
                         "nothing was changed there")
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    if removed:
        logger.warning("--overwrite: removed the earlier export in %s (%d files: %s)", args.output_dir, len(removed),
                       ", ".join(removed))
    logger.info("exported %s (%s) to %s%s", type(model).__name__, args.format, args.output_dir,
                "" if temperature is None else f"; temperature {temperature:.4f} "
                + ("folded into score.weight" if folded else "stored in reranker_config.json and " + PROMPT_FILE))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
