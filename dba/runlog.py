"""A run's event log, `train.jsonl`: one JSON record per line, flushed per line (framework-free:
the trainer writes it, `dba report` and the plots read it).

The records follow v29's format, so v29's own readers (its analysis plot, the upstream plotting
scripts) read a dba run: each has a `"type"` (`meta`, `train`, `eval`, `analysis`, `done`, and
dba's `nonfinite`) and v29's field names (`step`, `loss`, `lr`, `tok_s`; `train_loss`,
`val_loss`, `best_val`; `config` and `args` in `meta`). dba runs written before this used the
key `"event"`; `read_events` accepts both."""

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
        """Append one record; v29's key `"type"` names its kind on disk. The returned dict also
        carries it as `"event"` (what dba's readers used before), as `read_events` gives it."""
        rec = {"type": event, "time": round(datetime.datetime.now().timestamp(), 3)}
        rec.update(clean_record(fields))
        self._write(json.dumps(rec, sort_keys=False) + "\n")
        return {**rec, "event": event}

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


def event_kind(rec: dict[str, Any]) -> str | None:
    """A record's kind: v29's `"type"` (what dba writes now) or `"event"` (dba runs before)."""
    kind = rec.get("type", rec.get("event"))
    return kind if isinstance(kind, str) else None


def read_events(path: str | Path, event: str | None = None) -> list[dict[str, Any]]:
    """Records of a train.jsonl (optionally one kind), skipping a torn last line and lines that
    are not records. Old (`"event"`) and new (`"type"`) records both load; each returned record
    carries its kind under both keys."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            kind = event_kind(rec) if isinstance(rec, dict) else None
            if kind is None or (event is not None and kind != event):
                continue
            out.append({**rec, "type": kind, "event": kind})
    return out
