"""What every CLI shares, and the only module that knows argparse: the parser, the shared flag groups,
output checks before the work, logging set-up, one error path, and no lost work.

Library modules take typed values; scripts turn their flags into those here or in their own ``main()``.
The user-error type stays :class:`esci_dataset.ESCIDataError`.

    try:
        check_output_file(args.output, "--output")        # before any slow step
        ...
    except ESCIDataError as exc:
        return cli_error(exc)                              # "error: ..." on stderr, exit code 2
    ...
    return save_or_fallback(args.output, write, "--output")  # disk full after the work: keep it elsewhere
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import tempfile
import uuid
from typing import Callable

from esci_dataset import ESCIDataError
from tiny_reranker.batching import DEFAULT_BATCH_SIZE, DEFAULT_MAX_BATCH_TOKENS
from tiny_reranker.contract import PROMPT_FILE
from tiny_reranker.io import atomic_write
from tiny_reranker.serving import SERVING_FILE

USER_ERROR = 2  # exit code for bad input, as argparse uses for bad flags; internal bugs stay tracebacks (1)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written (examples keep their lines), and each flag's default shown.

    Required flags, switches (default False) and unset options (default None) show none:
    "(default: None)" says nothing the help text does not.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-paragraph error: ``prog: error: <message>`` and a pointer to ``--help``, exit code 2.

    argparse's own error prints the whole usage block first (23 lines for train.py) above the one line
    that says what is wrong; ``--help`` is one flag away when the usage is wanted.
    """

    def error(self, message: str):
        self.exit(USER_ERROR, f"{self.prog}: error: {message} (python {self.prog} --help lists every flag)\n")


# ---------------------------------------------------------------------------
# Logging and errors
# ---------------------------------------------------------------------------
def set_up_logging(logger: logging.Logger, args: argparse.Namespace, is_main: bool = True, stream=None) -> None:
    """INFO on the main process, where ``logger`` (the script's) logs the flags once; warnings only on the other
    ranks under torchrun. ``stream``: where log lines go (default stderr, so stdout can carry JSON lines)."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=stream or sys.stderr,
                        level=logging.INFO if is_main else logging.WARNING)
    quiet_third_party_output()
    if is_main:
        logger.info("arguments: %s", json.dumps(vars(args), sort_keys=True))


def quiet_third_party_output() -> None:
    """Hide what libraries print that a user cannot act on: transformers' and the hub's progress bars (loading
    weights, writing shards) and huggingface_hub's "Repo card metadata block was not found" (peft reads our
    model card). Our own bars (tokenizing, training, scoring) stay; data_cache hides datasets' saving bar."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    logging.getLogger("huggingface_hub.repocard").setLevel(logging.ERROR)


def cli_error(error: BaseException | str) -> int:
    """Print ``error: <message>`` as one paragraph on stderr and return the exit code 2."""
    message = re.sub(r"\s*\n\s*", " ", str(error).strip())  # one paragraph; spaces inside values are kept
    print(f"error: {message}", file=sys.stderr)
    return USER_ERROR


# ---------------------------------------------------------------------------
# Output paths, checked before the work
# ---------------------------------------------------------------------------
def _nearest_existing(path: str) -> str:
    """``path`` or its closest ancestor that exists (the folder ``makedirs`` would start from)."""
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _probe_writable(folder: str, flag: str, path: str) -> None:
    """Create and remove a file in ``folder``: permission bits alone miss root, read-only mounts and ACLs."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise ESCIDataError(f"{flag} {path}: cannot write in {folder} ({exc.strerror or exc})") from None


def _check_creatable_folder(folder: str, flag: str, path: str) -> None:
    """``folder`` exists or can be made with ``os.makedirs``, and files can be written in it."""
    existing = _nearest_existing(folder)
    if not os.path.isdir(existing):
        raise ESCIDataError(f"{flag} {path}: {existing} is not a folder, so {folder} cannot be created")
    _probe_writable(existing, flag, path)


def check_output_file(path: str, flag: str) -> None:
    """Before any work: ``path`` is not a folder, and its folder exists (or can be created) and is writable.

    Creates nothing. Raises :class:`ESCIDataError` naming ``flag`` and ``path``.
    """
    if os.path.isdir(path):
        raise ESCIDataError(f"{flag} {path}: is a folder; give a file path")
    _check_creatable_folder(os.path.dirname(os.path.abspath(path)), flag, path)


def check_output_dir(path: str, flag: str) -> None:
    """Before any work: ``path`` is a folder or can be created, and files can be written in it.

    Creates nothing. Raises :class:`ESCIDataError` naming ``flag`` and ``path``.
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise ESCIDataError(f"{flag} {path}: exists and is a file, not a folder")
    _check_creatable_folder(os.path.abspath(path), flag, path)


# ---------------------------------------------------------------------------
# Outputs never land on inputs (or on each other)
# ---------------------------------------------------------------------------
# Files an adapter folder holds as the model (train.py and peft write them): an output may be a new file in the
# adapter folder (eval.py's default metrics path is there), never one of these.
MODEL_FILE_NAMES = frozenset({"reranker_config.json", "run_config.json", "train_metrics.json", "train_curves.png",
                              "README.md", "config.json", "generation_config.json", "special_tokens_map.json",
                              "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", PROMPT_FILE,
                              SERVING_FILE})
_MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")


def is_within(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or below it (both already resolved)."""
    return os.path.commonpath([path, folder]) == folder


def folder_relation(output_dir: str, folder: str) -> str | None:
    """How an output folder stands to an input folder (paths resolved): ``"is"``, ``"is inside"``, ``"contains"``,
    or None when they are apart."""
    out, real = os.path.realpath(os.path.expanduser(output_dir)), os.path.realpath(os.path.expanduser(folder))
    return "is" if out == real else "is inside" if is_within(out, real) else "contains" if is_within(real, out) else None


def is_model_file_name(name: str) -> bool:
    """Whether a file named ``name`` is part of a saved model or adapter: weights, config or tokenizer."""
    return name in MODEL_FILE_NAMES or name.startswith(("adapter_", "tokenizer")) or name.endswith(_MODEL_FILE_SUFFIXES)


def _is_model_file(folder: str, output: str) -> bool:
    """Whether ``output`` (inside ``folder``) is part of the model there: a model file, or anything in a
    subfolder (``checkpoint-*``)."""
    return os.sep in os.path.relpath(output, folder) or is_model_file_name(os.path.basename(output))


def check_outputs_apart(outputs: dict[str, str | None], inputs: dict[str, str | None],
                        model_folders: tuple[str, ...] = ("--lora_model",)) -> None:
    """Before any work: no output file is an input file, sits in a base model folder, overwrites a file of an
    adapter folder's model, or is another output of the same run. Paths are resolved (``~``, ``..``, links).

    ``outputs`` / ``inputs``: flag -> path (None: not given; an input that is no local path, e.g. a hub id, is
    skipped). ``model_folders``: input flags whose folder may receive new files (an adapter's eval metrics),
    though never over the model's own files; any other input folder receives none.
    """
    seen: dict[str, str] = {}
    for out_flag, out_path in outputs.items():
        if not out_path:
            continue
        out = os.path.realpath(os.path.expanduser(out_path))
        if out in seen:
            raise ESCIDataError(f"{out_flag} {out_path} is the same file as {seen[out]}: one output would replace the "
                                "other. Give each its own path")
        seen[out] = f"{out_flag} {out_path}"
        for in_flag, in_path in inputs.items():
            if not in_path or not os.path.exists(os.path.expanduser(in_path)):
                continue
            real = os.path.realpath(os.path.expanduser(in_path))
            if out == real:
                raise ESCIDataError(f"{out_flag} {out_path} is the {in_flag} file {in_path}: writing it would destroy "
                                    "the input. Write the output to another path")
            if os.path.isdir(real) and is_within(out, real) and (in_flag not in model_folders
                                                                 or _is_model_file(real, out)):
                raise ESCIDataError(f"{out_flag} {out_path} is inside the {in_flag} folder {in_path}"
                                    + (" and would replace one of its model files" if in_flag in model_folders else "")
                                    + ". Write the output to another path")


# ---------------------------------------------------------------------------
# Keeping finished work when the final write fails
# ---------------------------------------------------------------------------
def fallback_path(path: str, fallback_dir: str | None = None) -> str:
    """A new file in ``fallback_dir`` (default: the system temp folder) with ``path``'s name and extension."""
    stem, ext = os.path.splitext(os.path.basename(path))
    return os.path.join(fallback_dir or tempfile.gettempdir(), f"{stem}.{uuid.uuid4().hex[:8]}{ext}")


def save_or_fallback(path: str, write: Callable[[str], None], flag: str, fallback_dir: str | None = None) -> int:
    """Write the finished work to ``path`` (``write(tmp)`` writes a whole file, made atomic here).

    Returns 0 on success. If that fails with an OSError (disk full, folder removed
    meanwhile, ...), writes the same to :func:`fallback_path`, prints both the
    failure and where the work now is, and returns 2, so hours of scoring are
    never thrown away for want of disk space.
    """
    try:
        atomic_write(path, write)
        return 0
    except OSError as exc:
        first = f"{flag} {path}: writing failed ({exc.strerror or exc})"
    backup = fallback_path(path, fallback_dir)
    try:
        atomic_write(backup, write)
    except OSError as exc:
        return cli_error(f"{first}; the fallback {backup} failed too ({exc.strerror or exc}), so the results are lost")
    return cli_error(f"{first}; the results were saved to {backup} instead")


# ---------------------------------------------------------------------------
# The model and batching flags eval.py and predict.py share (one definition, one help text)
# ---------------------------------------------------------------------------
def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def add_dtype_args(group, what: str) -> None:
    """``--dtype`` and its shorthand ``--bf16`` (one definition for train.py, eval.py and predict.py);
    :func:`dtype_flag` folds the two into one value."""
    group.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                       help=f"{what}; auto = bf16 on CUDA and on CPUs with native bf16 (avx512_bf16/AMX), else fp32")
    group.add_argument("--bf16", action="store_true", help="shorthand for --dtype bf16")


def dtype_flag(args: argparse.Namespace) -> str:
    """The dtype :func:`add_dtype_args`' flags ask for: ``bf16`` under --bf16, else --dtype's value."""
    return "bf16" if args.bf16 else args.dtype


def add_inference_args(parser) -> None:
    """The model and batching flags shared by eval.py and predict.py (one definition, one help text)."""
    g = parser.add_argument_group("model")
    g.add_argument("--base_model", type=str, required=True,
                   help="base causal LM folder or hub id (the one the adapter was trained on), or a merged export")
    g.add_argument("--lora_model", type=str, default=None,
                   help="LoRA adapter folder from train.py; omit for the zero-shot baseline or a merged export")
    add_dtype_args(g, "weights dtype")
    g.add_argument("--no_flash_attn", action="store_true", help="force PyTorch sdpa attention even when flash-attn is installed")
    g.add_argument("--no_temperature", action="store_true",
                   help="score with the raw label logits, ignoring the temperature train.py stored in "
                        "reranker_config.json (by default it is applied: same predicted labels, calibrated "
                        "probabilities, and a score that can order items differently)")
    g = parser.add_argument_group("batching")
    g.add_argument("--max_length", type=positive_int, default=512,
                   help="max prompt tokens; only the item text (then the query) is truncated, as in training")
    g.add_argument("--batch_size", type=positive_int, default=DEFAULT_BATCH_SIZE,
                   help="most pairs per forward pass (batches are length-sorted)")
    g.add_argument("--max_batch_tokens", type=non_negative_int, default=DEFAULT_MAX_BATCH_TOKENS,
                   help="most padded tokens per forward pass; long items go in smaller batches (0 = no limit)")


def reranker_from_args(args: argparse.Namespace, device=None):
    """Load the :class:`Reranker` :func:`add_inference_args`' flags describe (raises ESCIDataError / OSError /
    ValueError)."""
    from tiny_reranker.reranker import Reranker

    return Reranker.from_pretrained(args.base_model, args.lora_model, device=device,
                                    dtype=dtype_flag(args), max_length=args.max_length,
                                    batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens or None,
                                    no_flash_attn=args.no_flash_attn, temperature=1.0 if args.no_temperature else None)
