"""Files the toolkit reads and writes: strict JSON, and writes that are complete or absent.

Every JSON file (``reranker_config.json``, ``run_config.json``, metrics, summaries) is written by
:func:`write_json` and read by :func:`read_json_object`; every output file goes through
:func:`atomic_write`, so a crash, a kill or a full disk never leaves a truncated file behind.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from typing import Any, Callable

import numpy as np

from esci_dataset import ESCIDataError


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` into a hidden temp file next to ``path``, then ``os.replace`` it onto ``path``.

    ``path``'s folder is created if needed. A crash leaves at most a stray ``.<name>.*.tmp`` file,
    never a truncated ``path``.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def json_safe(value: Any) -> Any:
    """``value`` with NaN/±inf (and pandas NA/NaT) as None and numpy scalars/arrays as Python types.

    Everything else is left for ``json.dumps``'s ``default``.
    """
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if type(value).__name__ in ("NAType", "NaTType"):  # pandas missing values, without importing pandas
        return None
    return value


def dumps_strict(obj: Any, **kwargs) -> str:
    """``json.dumps`` that never writes ``NaN``/``Infinity`` (they become ``null``); other types via ``str``."""
    kwargs.setdefault("default", str)  # timestamps, decimals, ...
    return json.dumps(json_safe(obj), allow_nan=False, **kwargs)


def write_text(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) atomically: ``path`` is complete or untouched."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def write_json(path: str, obj: Any, indent: int = 2) -> None:
    """Write ``obj`` as strict JSON (NaN/±inf -> null), atomically: ``path`` is complete or untouched."""
    write_text(path, dumps_strict(obj, indent=indent, ensure_ascii=False) + "\n")


def read_json_object(path: str) -> dict:
    """A JSON object from ``path``; an unreadable, empty or non-object file is an ESCIDataError naming it."""
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError) as exc:
        raise ESCIDataError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(value, dict):
        raise ESCIDataError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value
