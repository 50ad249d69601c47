"""An output written chunk by chunk, that a killed run can resume: ``predict.py --output F`` at catalog scale.

While the run goes, the output is a folder beside it, ``F.partial/``:

* ``chunk-000000.<ext>``, ``chunk-000001.<ext>``, ...: each chunk's scored rows, in input order, each file
  written atomically (complete or absent);
* ``state.json``: what the run is (input file, model files, the flags that change the numbers) and how many
  chunks are complete, updated after each chunk.

When every chunk is in, they are joined into ``F`` (atomically) and the folder is removed. ``--resume``
checks ``state.json`` against the new command and continues after the last complete chunk, so every pair
is scored once, in order. Memory is bounded by one chunk, not by the input.
"""

from __future__ import annotations

import os
import shutil
from typing import Callable

from esci_dataset import ESCIDataError
from tiny_reranker.io import atomic_write, read_json_object, write_json

PARTIAL_SUFFIX = ".partial"
STATE_NAME = "state.json"
STATE_VERSION = 1


def file_identity(path: str) -> dict:
    """What stands for a file's content without reading it: its resolved path, size and modification time."""
    stat = os.stat(path)
    return {"path": os.path.realpath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def folder_identity(path: str | None) -> dict | str | None:
    """A model folder's files (name, size, modification time), or a hub id as given, or None."""
    if not path:
        return None
    folder = os.path.expanduser(path)
    if not os.path.isdir(folder):
        return path
    return {name: [os.path.getsize(os.path.join(folder, name)), os.stat(os.path.join(folder, name)).st_mtime_ns]
            for name in sorted(os.listdir(folder)) if os.path.isfile(os.path.join(folder, name))}


class PartialOutput:
    """The chunk folder of one output file (see the module docstring)."""

    def __init__(self, output: str, identity: dict):
        self.output, self.identity = output, identity
        self.folder = output + PARTIAL_SUFFIX
        self.ext = os.path.splitext(output)[1].lower()
        self.done = 0

    def chunk_path(self, index: int) -> str:
        return os.path.join(self.folder, f"chunk-{index:06d}{self.ext}")

    def open(self, resume: bool) -> int:
        """Check a fresh start, or with ``resume`` take up the folder an interrupted run left; returns the number
        of complete chunks. Refused (ESCIDataError) with a partial output but no ``resume``, with ``resume`` but
        none, or when the partial output belongs to another input, model or flags."""
        state_path = os.path.join(self.folder, STATE_NAME)
        if not os.path.lexists(self.folder):
            if resume:
                raise ESCIDataError(f"--resume: there is no partial output {self.folder} to continue; run without "
                                    "--resume to start")
            return 0  # the folder appears with the first complete chunk: a run refused before it writes nothing
        if not os.path.isdir(self.folder):
            raise ESCIDataError(f"--output {self.output}: {self.folder} exists and is not a folder; predict.py keeps its "
                                "partial output under that name: move the file away, or choose another --output")
        if not resume:
            raise ESCIDataError(f"--output {self.output}: {self.folder} holds the partial output of an interrupted run. "
                                f"Continue it with the same command and --resume, or delete {self.folder} to start over")
        if not os.path.isfile(state_path):
            raise ESCIDataError(f"--resume: {self.folder} has no {STATE_NAME}, so it is not a partial output of "
                                "predict.py; move it away, or choose another --output")
        state = read_json_object(state_path)
        saved, done = state.get("identity"), state.get("chunks_done")
        if not isinstance(saved, dict) or isinstance(done, bool) or not isinstance(done, int) or done < 0:
            raise ESCIDataError(f"--resume: {state_path} is damaged, so {self.folder} is not a partial output this "
                                f"run can continue; delete {self.folder} to start over")
        differ = sorted(k for k in set(saved) | set(self.identity) if saved.get(k) != self.identity.get(k))
        if differ:
            flags = saved.get("flags") if isinstance(saved.get("flags"), dict) else {}
            detail = [f"--{k} {flags.get(k)!r} (partial output) vs {v!r} (now)"
                      for k, v in self.identity.get("flags", {}).items() if flags.get(k) != v]
            raise ESCIDataError(f"--resume: {self.folder} was written for another {', '.join(differ)} than this "
                                f"command's{' (' + '; '.join(detail) + ')' if detail else ''}; resume with the "
                                f"interrupted command's input, model and flags, or delete {self.folder} to start over")
        self.done = done
        missing = [i for i in range(self.done) if not os.path.isfile(self.chunk_path(i))]
        if missing:
            raise ESCIDataError(f"--resume: {self.folder} lacks chunk {missing[0]} of the {self.done} it records as "
                                f"complete; delete {self.folder} to start over")
        return self.done

    def add(self, index: int, write: Callable[[str], None]) -> None:
        """Write chunk ``index`` (``write(tmp)`` writes the whole file) and record it as complete."""
        if index != self.done:
            raise RuntimeError(f"chunk {index} written after {self.done} complete ones")
        os.makedirs(self.folder, exist_ok=True)
        atomic_write(self.chunk_path(index), write)
        self.done += 1
        self._save_state()

    def join(self, target: str) -> None:
        """The complete chunks, in order, as one file at ``target`` (parquet: one row group per chunk)."""
        paths = [self.chunk_path(i) for i in range(self.done)]
        if self.ext == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            schema = pa.unify_schemas([pq.read_schema(p) for p in paths], promote_options="permissive")
            with pq.ParquetWriter(target, schema) as writer:
                for path in paths:  # one chunk in memory at a time
                    writer.write_table(pq.read_table(path).cast(schema))
            return
        with open(target, "wb") as out:
            for path in paths:
                with open(path, "rb") as f:
                    shutil.copyfileobj(f, out)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def _save_state(self) -> None:
        write_json(os.path.join(self.folder, STATE_NAME),
                   {"version": STATE_VERSION, "identity": self.identity, "chunks_done": self.done})
