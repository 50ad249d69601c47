"""Score (query, item_text) pairs with a trained reranker: a file in, the same rows plus predictions out.

Added columns: p_E, p_S, p_C, p_I (softmax over the four labels), score = (3·p_E + 2·p_S + p_C) / 3
and pred_label (the argmax). Scoring is tiny_reranker.Reranker, the same path as eval.py.

Files:   python predict.py --base_model Qwen/Qwen3-0.6B --lora_model outputs/lora --input pairs.parquet --output scored.parquet
Stdin:   echo '{"query": "usb c charger", "items": ["Anker 65W charger", "HDMI cable"]}' | python predict.py --base_model ... --input -

Input: .parquet, .csv or .jsonl with columns query and item_text (other columns are kept),
or JSON lines on stdin ("-"). A JSON line is a pair {"query", "item_text"} or a request
{"query", "items": [...]}; blank lines are skipped. The output format follows --output's
extension (.parquet/.csv/.jsonl); without --output, JSON lines go to stdout. A pair line
gets the prediction fields added; a request line is answered by ONE line: the request
without "items", plus "results", its items ranked by score, each {index, item, p_*, score,
pred_label}, cut to --top_k. Requests can only be written as JSON lines. --rank_by expected_gain
ranks by p_E + 0.1·p_S + 0.01·p_C instead (ESCI's nDCG gains) and adds that column / field.

Input columns are never overwritten: if one is named like an output (p_E ... pred_label, or
results for a request), predict refuses and asks for --column_prefix, which writes ours as
PREFIX + name. JSON output is strict: NaN and infinities become null.

Bad input (a blank or non-text query/item, a line that is not a JSON object) is an error,
exit 2, checked over the whole input with --output before the model loads. Files are written
atomically; if the final write fails (a full disk), the results go to the system temp folder and
the error says where.

Large inputs stream: --chunk_size pairs are read, scored and written at a time, so memory is
bounded by a chunk, and one progress bar (pairs/s, ETA) covers the whole input. With --output F,
complete chunks go to F.partial/ and are joined into F when the run ends; after a kill, the same
command with --resume checks that F.partial/ belongs to the same input, model and flags, and
continues after its last complete chunk (every pair scored once, in order).

--engine vllm scores through one vLLM engine in its own venv (--vllm_python) on an export.py folder
(merged or seq_cls), with the same input, output, chunks and --resume; the pairs are tokenized here as
for the default engine and sent as token ids, so the probabilities are the same (scripts/check_vllm.sh).

A temperature stored with the adapter (train.py fits one by default) divides the label logits before the
softmax; --no_temperature scores the raw logits. Several GPUs: torchrun --nproc_per_node N predict.py
... --input FILE: each rank scores its share of every chunk, rank 0 writes them in input order.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
from tqdm.auto import tqdm

from esci_dataset import RANK_BY, ESCIDataError
from tiny_reranker import distributed
from tiny_reranker.cli import (
    ArgumentParser,
    HelpFormatter,
    add_inference_args,
    check_output_file,
    check_outputs_apart,
    cli_error,
    dtype_flag,
    positive_int,
    reranker_from_args,
    save_or_fallback,
    set_up_logging,
)
from tiny_reranker.model_files import check_model_paths
from tiny_reranker.modeling import resolve_dtype
from tiny_reranker.pairs import (
    check_no_clash,
    extension,
    flat_pairs,
    iter_jsonl_chunks,
    iter_table_chunks,
    jsonl_lines,
    record_columns,
    unwritable_parquet_field,
    with_predictions,
    write_output,
)
from tiny_reranker.scoring import OUTPUT_COLUMNS, PROB_COLUMNS, probs_from_logits
from tiny_reranker.streaming import PartialOutput, file_identity, folder_identity

logger = logging.getLogger("predict")
ENGINES = ("transformers", "vllm")


def make_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter, allow_abbrev=False)
    add_inference_args(p)

    g = p.add_argument_group("engine")
    g.add_argument("--engine", choices=ENGINES, default="transformers",
                   help="transformers: this repo's scoring path (Reranker, as eval.py). vllm: one vLLM engine in its own "
                        "venv scores the pairs, tokenized here exactly as by transformers; --base_model is then an "
                        "export.py folder (merged or seq_cls) and there is no --lora_model, no torchrun")
    g.add_argument("--vllm_python", type=str, default=os.environ.get("TINY_RERANKER_VLLM_PYTHON"),
                   help="--engine vllm: the python of a venv with vLLM (default: $TINY_RERANKER_VLLM_PYTHON; "
                        "scripts/check_vllm.sh builds one in .venv-vllm)")
    g = p.add_argument_group("input and output")
    g.add_argument("--input", type=str, required=True, help="a .parquet/.csv/.jsonl file with query and item_text columns, or - for JSON lines on stdin")
    g.add_argument("--output", type=str, default=None,
                   help="output file, format by extension (.parquet/.csv/.jsonl); its folder is created if needed. "
                        "Without it: JSON lines on stdout")
    g.add_argument("--top_k", type=int, default=None, help="for {query, items} requests: keep only the best K ranked items (without it: all)")
    g.add_argument("--rank_by", choices=RANK_BY, default="score",
                   help="what requests' items are ranked by: score = (3·p_E + 2·p_S + p_C) / 3, or expected_gain = "
                        "p_E + 0.1·p_S + 0.01·p_C (ESCI's nDCG gains; also added as a column). README: which to use "
                        "(default: %(default)s)")
    g.add_argument("--chunk_size", type=positive_int, default=DEFAULT_CHUNK_SIZE,
                   help="pairs read, scored and written at a time (a request's items stay together): memory is "
                        "bounded by one chunk. With --output, complete chunks go to OUTPUT.partial/ until the run "
                        "ends, and --resume continues there after a kill")
    g.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from OUTPUT.partial/ (same input, model and flags; checked)")
    g.add_argument("--column_prefix", type=str, default="",
                   help="write our columns as PREFIX + name (e.g. pred_ -> pred_score); needed when the input already "
                        f"has a column or field named {', '.join(OUTPUT_COLUMNS)} (or results, for requests) (default: %(default)r)")
    return p


# ---------------------------------------------------------------------------
# Input, in chunks: one pass checks all of it before the model loads, the second scores it
# ---------------------------------------------------------------------------
DEFAULT_CHUNK_SIZE = 10_000  # pairs in flight: ~120 MB with ~2 KB items (~12 KB a pair in all); a minute of GPU work


def input_chunks(args, stdin_lines: list[str] | None):
    """A fresh iterator over the input's chunks: DataFrames for .parquet/.csv, lists of records for JSON lines."""
    if args.input == "-":
        return iter_jsonl_chunks(stdin_lines, "<stdin>", args.chunk_size)
    if extension(args.input, "--input") == ".jsonl":
        return _jsonl_file_chunks(args.input, args.chunk_size)
    return iter_table_chunks(args.input, args.chunk_size)


def _jsonl_file_chunks(path: str, chunk_size: int):
    if not os.path.exists(path):
        raise ESCIDataError(f"{path}: file not found")
    with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark (Windows editors) is not text
        yield from iter_jsonl_chunks(f, path, chunk_size)


def scan_input(args, stdin_lines: list[str] | None) -> tuple[int, int, list[str] | None]:
    """Read the whole input once, chunk by chunk, checking everything that can be wrong with it before the model
    loads: bad rows or lines, columns we would overwrite, and records that do not fit --output's format.
    Returns ``(pairs, chunks, columns)``; ``columns``: for JSON records written as a table, the output's columns
    in order (every chunk is written with them, so chunks line up), else None."""
    source = "<stdin>" if args.input == "-" else args.input
    pairs = chunks = 0
    schemas, columns = [], {}
    for chunk in input_chunks(args, stdin_lines):
        df, records = (chunk, None) if isinstance(chunk, pd.DataFrame) else (None, chunk)
        check_no_clash(df, records, args.column_prefix, source, args.rank_by)
        if records is not None:
            schemas += check_output_fits(args, records)
            record_columns(records, args.column_prefix, columns, args.rank_by)
        pairs += len(flat_pairs(df, records)[0])
        chunks += 1
    if len(schemas) > 1:  # chunks must also fit one parquet schema together
        try:
            pa.unify_schemas(schemas, promote_options="permissive")
        except (pa.ArrowException, ValueError, TypeError) as exc:
            raise ESCIDataError(f"--output {args.output}: the input's JSON fields do not fit parquet columns "
                                f"({str(exc).splitlines()[0]}); write .jsonl or .csv instead") from None
    table_output = args.output is not None and not args.output.lower().endswith(".jsonl")
    return pairs, chunks, (list(columns) if table_output and columns else None)


def check_output_path(args) -> None:
    """``--output`` has a known format and can be written (its folder may not exist yet)."""
    if args.output is not None:
        extension(args.output, "--output")
        check_outputs_apart({"--output": args.output}, {"--input": None if args.input == "-" else args.input,
                                                        "--base_model": args.base_model, "--lora_model": args.lora_model})
        check_output_file(args.output, "--output")  # after: its write probe must not touch an input folder
    elif args.resume:
        raise ESCIDataError("--resume needs --output: a run to stdout leaves no partial output to continue")


def check_output_fits(args, records: list[dict]) -> list:
    """The records can be written in ``--output``'s format; for parquet, returns their schema (one item)."""
    if args.output is None:
        return []
    ext = extension(args.output, "--output")
    if ext != ".jsonl" and any("items" in r for r in records):
        raise ESCIDataError(f"--output {args.output}: {{query, items}} requests produce ranked lists; "
                            "write them as .jsonl or to stdout")
    if ext == ".parquet" and records:  # found now, not after scoring: a field whose values mix types
        try:
            schema = pa.Table.from_pandas(pd.DataFrame(records), preserve_index=False).schema
        except (pa.ArrowException, ValueError, TypeError) as exc:
            raise ESCIDataError(f"--output {args.output}: the input's JSON fields do not fit parquet columns "
                                f"({str(exc).splitlines()[0]}); write .jsonl or .csv instead") from None
        if (field := unwritable_parquet_field(schema)):
            raise ESCIDataError(f"--output {args.output}: the JSON field {field!r} holds an empty object, which "
                                "parquet cannot store; write .jsonl or .csv instead")
        return [schema]
    return []


def check_engine(args, world_size: int) -> None:
    """``--engine vllm``'s model is one export folder with serving.json, scored by one process."""
    if args.engine != "vllm":
        return
    from tiny_reranker.serving import SERVING_FILE

    if not args.vllm_python:
        raise ESCIDataError("--engine vllm needs --vllm_python (or $TINY_RERANKER_VLLM_PYTHON): the python of a venv "
                            "with vLLM; bash scripts/check_vllm.sh builds one in .venv-vllm")
    if not os.path.isfile(os.path.expanduser(args.vllm_python)):
        raise ESCIDataError(f"--vllm_python {args.vllm_python}: file not found")
    if args.lora_model:
        raise ESCIDataError("--engine vllm serves an export, not an adapter: run python export.py --base_model ... "
                            "--lora_model ... --output_dir export/seq_cls --format seq_cls, then pass --base_model "
                            "export/seq_cls without --lora_model")
    if not os.path.isfile(os.path.join(os.path.expanduser(args.base_model), SERVING_FILE)):
        raise ESCIDataError(f"--engine vllm: --base_model {args.base_model} has no {SERVING_FILE}, so it is not an "
                            "export.py folder (merged or seq_cls); export one first (a folder from an older "
                            "export.py: export it again)")
    if world_size > 1:
        raise ESCIDataError("--engine vllm runs one vLLM engine: run predict.py without torchrun (vLLM spreads its "
                            "own work; --tensor-parallel-size is vLLM's)")


def load_scorer(args, device):
    """What scores the chunks: a Reranker, or with --engine vllm a VllmScorer (raises OSError/ValueError/
    RuntimeError when the model or engine cannot start)."""
    if args.engine != "vllm":
        return reranker_from_args(args, device=device)
    from tiny_reranker.vllm_engine import VllmScorer

    return VllmScorer(os.path.expanduser(args.vllm_python), args.base_model, args.max_length,
                      str(resolve_dtype(dtype_flag(args))), args.no_temperature)


def run_identity(args, stdin_lines: list[str] | None = None) -> dict:
    """What a partial output must share with the command that resumes it: the input (stdin: a hash of what was
    piped), the model files, and the flags that change the numbers or the rows (not --batch_size or
    --max_batch_tokens: an OOM may need others)."""
    if args.input == "-":
        source = {"stdin_sha256": hashlib.sha256("".join(stdin_lines or []).encode("utf-8", "surrogatepass")).hexdigest()}
    else:
        source = file_identity(args.input)
    flags = {k: getattr(args, k) for k in ("max_length", "no_temperature", "no_flash_attn", "top_k", "column_prefix",
                                            "chunk_size", "rank_by", "engine")}
    flags["dtype"] = str(resolve_dtype(dtype_flag(args)))  # --bf16 and --dtype bf16 (and auto, here) alike
    return {"input": source, "base_model": folder_identity(args.base_model),
            "lora_model": folder_identity(args.lora_model), "flags": flags}


def finish_output(tmp: str, partial: PartialOutput) -> None:
    """The final --output (``tmp``: the temp file of its atomic write): the partial output's chunks, joined."""
    partial.join(tmp)


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    # 1. Arguments, processes, logging (stderr only: stdout may carry the JSON lines) -----
    args = make_parser().parse_args(argv)
    shard = distributed.start()  # torchrun: each rank scores its share of every chunk; rank 0 writes
    set_up_logging(logger, args, shard.is_main)  # stderr: stdout may carry the JSON lines
    if args.top_k is not None and args.top_k < 0:
        return cli_error(f"--top_k must be >= 0, got {args.top_k}")

    try:
        # 2. Input and output checks over the whole input, before the (slow) model load ------------
        check_engine(args, shard.world_size)
        if args.engine == "transformers":  # an export for vLLM may be a seq_cls folder, which Reranker refuses
            check_model_paths(args.base_model, args.lora_model)
        check_output_path(args)
        if args.input == "-" and shard.world_size > 1:
            raise ESCIDataError("--input -: torchrun processes cannot share stdin; write the pairs to a file")
        stdin_lines = sys.stdin.readlines() if args.input == "-" else None  # a pipe can be read only once
        n_pairs, n_chunks, columns = scan_input(args, stdin_lines)
        partial = None
        if args.output is not None:
            partial = PartialOutput(args.output, run_identity(args, stdin_lines))
            if shard.is_main:  # one rank decides; every rank then refuses or skips alike, so none is left waiting
                try:
                    done = partial.open(args.resume)
                except ESCIDataError as exc:
                    done = str(exc)
            done = shard.broadcast(done if shard.is_main else None)
            if isinstance(done, str):
                raise ESCIDataError(done)
        else:
            done = 0
    except ESCIDataError as exc:
        return cli_error(exc)
    logger.info("%d pair(s) in %d chunk(s) of up to %d to score from %s%s", n_pairs, n_chunks, args.chunk_size,
                args.input, f"; resuming after chunk {done}" if done else "")

    # 3. Model (skipped when there is nothing left to score) ---------------------------
    reranker = None
    if n_pairs and done < n_chunks:
        try:
            reranker = load_scorer(args, shard.device)
        except (OSError, ValueError, RuntimeError) as exc:  # unloadable model, another prompt, an engine that fails
            return cli_error(f"cannot load the reranker (--base_model {args.base_model}, --lora_model {args.lora_model}"
                             f"{', --engine vllm' if args.engine == 'vllm' else ''}): {exc}")
    elif not n_pairs:
        logger.warning("%s has no pairs; writing an empty output", args.input)
    try:
        return score_and_write(args, shard, reranker, stdin_lines, n_pairs, done, partial, columns)
    finally:
        if hasattr(reranker, "close"):
            reranker.close()  # the vLLM engine process


def score_and_write(args, shard, reranker, stdin_lines, n_pairs: int, done: int, partial, columns) -> int:
    """Steps 4 and 5 of main: every chunk scored and written in order, then the chunks joined into --output."""

    # 4. Score chunk by chunk (length-sorted batches; ranks share each chunk); rank 0 writes each in order ----
    ext = extension(args.output, "--output") if args.output else ".jsonl"
    progress = tqdm(total=n_pairs, unit="pair", desc="scoring", dynamic_ncols=True,
                    disable=not shard.is_main or args.input == "-")  # stderr, with pairs/s and an ETA
    for index, chunk in enumerate(input_chunks(args, stdin_lines)):
        df, records = (chunk, None) if isinstance(chunk, pd.DataFrame) else (None, chunk)
        queries, items = flat_pairs(df, records)
        if index < done:  # complete in the partial output: every pair is scored once
            progress.update(len(queries))
            continue
        probs = np.zeros((0, len(PROB_COLUMNS)))
        if queries:
            logits = shard.gather(reranker.predict_logits(shard.take(queries), shard.take(items)), len(queries))
            if shard.is_main:
                try:  # on rank 0 after the gather, so a refusal never leaves other ranks waiting
                    probs = probs_from_logits(logits, reranker.temperature)
                except ESCIDataError as exc:  # non-finite logits: a broken adapter or an overflowing dtype
                    progress.close()  # the error gets its own line
                    return cli_error(f"--base_model {args.base_model}, --lora_model {args.lora_model}: {exc}"
                                     + (f" (complete chunks are kept in {partial.folder})" if partial else ""))
        progress.update(len(queries))
        if not shard.is_main:
            continue
        df, records = with_predictions(df, records, probs, args.top_k, args.column_prefix, args.rank_by)
        if partial is None:  # stdout: each chunk as soon as it is scored
            sys.stdout.writelines(jsonl_lines(records if records is not None else df.to_dict(orient="records")))
            sys.stdout.flush()
        else:
            try:
                partial.add(index, lambda tmp, df=df, records=records, first=index == 0:
                            write_output(tmp, ext, df, records, header=first, columns=columns))
            except OSError as exc:  # a full disk mid-run: the complete chunks stay, and --resume goes on from them
                progress.close()
                return cli_error(f"--output {args.output}: writing chunk {index} into {partial.folder} failed "
                                 f"({exc.strerror or exc}); its {partial.done} complete chunk(s) are kept there. Free "
                                 "space, then run the same command with --resume")
    progress.close()
    if not shard.is_main:
        return 0
    if reranker is not None and (warning := reranker.encoder.truncation_warning()):
        logger.warning("input: %s", warning)  # (under torchrun: rank 0's share of the pairs)
    if partial is None:
        return 0

    # 5. Join the chunks into --output (if it cannot be written now, they go to a fallback file) -------
    rc = save_or_fallback(args.output, lambda tmp: finish_output(tmp, partial), "--output")
    if rc == 0:
        partial.remove()
        logger.info("wrote %s", args.output)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
