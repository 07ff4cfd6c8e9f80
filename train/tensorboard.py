"""`dba train --tb`: every numeric field of the train/eval/analysis events as a TensorBoard
scalar (tag `<event>/<field>`, x = step), written with tensorboardX to `<run>/tb`.

    tensorboard --logdir runs/
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

_SKIP = {"step", "time", "compiles", "grad_accum", "global_batch"}


class TBWriter:
    def __init__(self, logdir: str | Path):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(logdir=str(logdir), flush_secs=10)

    def event(self, rec: dict[str, Any]) -> None:
        kind = rec.get("event")
        if kind not in ("train", "eval", "analysis") or "step" not in rec:
            return
        step = int(rec["step"])
        for k, v in rec.items():
            if k in _SKIP or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            self.writer.add_scalar(f"{kind}/{k}", float(v), step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
