"""A run's event log, `train.jsonl`: one JSON event per line, flushed per line (framework-free:
the trainer writes it, `dba report` and the plots read it)."""

from __future__ import annotations

import datetime
import json
import math
import os
from pathlib import Path
from typing import Any

from dba.errors import UserError


def clean_record(v: Any) -> Any:
    """JSON-safe values: numpy scalars to Python, NaN/inf to None."""
    if isinstance(v, dict):
        return {str(k): clean_record(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [clean_record(x) for x in v]
    if hasattr(v, "item") and callable(v.item) and getattr(v, "ndim", 1) == 0:
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class JsonlLog:
    """Append-only event log. Every event is one line handed to the OS as soon as it is written
    (flushed), so a killed run's log is readable up to its last event. A run killed mid-line
    leaves a torn last line: appending (a resumed run) first ends it, so it stays one unreadable
    line that `read_events` skips instead of swallowing the next event. A failed write (disk
    full) is a one-line UserError."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        torn = False
        try:
            with open(self.path, "rb") as f:
                f.seek(0, os.SEEK_END)
                if f.tell() > 0:
                    f.seek(-1, os.SEEK_END)
                    torn = f.read(1) != b"\n"
        except FileNotFoundError:
            pass
        self._f = open(self.path, "a", encoding="utf-8")
        if torn:
            self._write("\n")

    def _write(self, text: str) -> None:
        try:
            self._f.write(text)
            self._f.flush()
        except OSError as e:
            raise UserError(f"cannot write {self.path}: {os.strerror(e.errno) if e.errno else e}", 1) from None

    def write(self, event: str, **fields: Any) -> dict[str, Any]:
        rec = {"event": event, "time": round(datetime.datetime.now().timestamp(), 3)}
        rec.update(clean_record(fields))
        self._write(json.dumps(rec, sort_keys=False) + "\n")
        return rec

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


def read_events(path: str | Path, event: str | None = None) -> list[dict[str, Any]]:
    """Events of a train.jsonl (optionally one kind), skipping a torn last line."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if event is None or rec.get("event") == event:
                out.append(rec)
    return out
