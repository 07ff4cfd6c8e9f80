"""Sequence-length curriculum: v29's `--seq-schedule "256@0,512@500,1024@2000"`.

Each entry `LEN@STEP` says "from optimizer step STEP on, train at LEN tokens". Steps count the
updates done before the one being taken (the first update is step 0). Before the first entry
starts (when it does not start at 0) the run trains at `--train-seq-len`. A bare `LEN` is
shorthand for `LEN@0`. The model's context must cover the longest length the run trains at:
the trainer grows `block_size` to `max_length(total_steps)`, never caps the schedule (SPEC §7).
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

from dba.errors import UserError

_ENTRY = re.compile(r"^\s*(\d+)\s*(?:@\s*(\d+)\s*)?$")


class ScheduleError(UserError):
    """A malformed --seq-schedule; the message names the schedule and the bad entry."""


@dataclass(frozen=True)
class SeqSchedule:
    """(start_step, length) pairs, strictly increasing in start_step, plus the fallback length
    used before the first entry starts."""

    entries: tuple[tuple[int, int], ...]
    default_len: int

    def length_at(self, step: int) -> int:
        """The sequence length of the update taken at `step` (0-based)."""
        starts = [s for s, _ in self.entries]
        i = bisect.bisect_right(starts, int(step)) - 1
        return self.entries[i][1] if i >= 0 else self.default_len

    def lengths_until(self, total_steps: int) -> list[int]:
        """The distinct lengths used by steps 0 .. total_steps-1, in order of first use."""
        out: list[int] = []
        if total_steps <= 0:
            return out
        if not self.entries or self.entries[0][0] > 0:
            out.append(self.default_len)
        for start, length in self.entries:
            if start < total_steps and length not in out:
                out.append(length)
        return out

    def max_length(self, total_steps: int) -> int:
        """The longest length any of steps 0 .. total_steps-1 trains at."""
        lengths = self.lengths_until(total_steps)
        return max(lengths) if lengths else self.length_at(0)

    def boundaries(self, total_steps: int) -> list[tuple[int, int]]:
        """(first step, length) for each change of length within the run."""
        out: list[tuple[int, int]] = []
        for step in [0] + [s for s, _ in self.entries if 0 < s < total_steps]:
            length = self.length_at(step)
            if not out or out[-1][1] != length:
                out.append((step, length))
        return out

    def to_string(self) -> str:
        return ",".join(f"{length}@{start}" for start, length in self.entries)


def parse_schedule(text: str | None, default_len: int) -> SeqSchedule:
    """Parse `LEN@STEP[,LEN@STEP...]`; empty/None gives a constant schedule at `default_len`.

    Malformed input raises ScheduleError (a one-line UserError) naming the schedule."""
    default_len = int(default_len)
    if default_len <= 0:
        raise ScheduleError(f"train seq len must be a positive integer, got {default_len}")
    if text is None or not str(text).strip():
        return SeqSchedule(entries=(), default_len=default_len)
    raw = str(text)
    parts = raw.split(",")
    entries: list[tuple[int, int]] = []
    for part in parts:
        m = _ENTRY.match(part)
        if m is None:
            raise ScheduleError(f"malformed --seq-schedule {raw!r}: entry {part.strip()!r} is not LEN@STEP "
                                f"(e.g. '256@0,512@500')")
        try:  # int() refuses more than sys.get_int_max_str_digits() (4300) digits
            length = int(m.group(1))
            start = None if m.group(2) is None else int(m.group(2))
        except ValueError:
            raise ScheduleError(f"malformed --seq-schedule {raw!r}: a number in entry {part.strip()[:40]!r}... "
                                f"is too long") from None
        if start is None:
            if len(parts) != 1:
                raise ScheduleError(f"malformed --seq-schedule {raw!r}: entry {part.strip()!r} needs @STEP "
                                    f"(a bare length is only allowed alone)")
            start = 0
        if length <= 0:
            raise ScheduleError(f"malformed --seq-schedule {raw!r}: length in {part.strip()!r} must be positive")
        if entries and start <= entries[-1][0]:
            raise ScheduleError(f"malformed --seq-schedule {raw!r}: steps must increase strictly "
                                f"({start} after {entries[-1][0]})")
        entries.append((start, length))
    return SeqSchedule(entries=tuple(entries), default_len=default_len)
