"""What the attention analysis pass measures, framework-free: the selection (`AnalysisSpec`,
`spec_for`, `parse_indices`), the held-out sequence it runs on (`analysis_tokens`) and the
reduction of its per-(layer, head) arrays to the `analysis` event's numbers (`summarise`).

Shared by the JAX pass (train/analysis.py, which re-exports these names) and the torch pass
(torch_ref/analysis.py); imports neither JAX nor torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from dba.errors import UserError

ROW_METRICS = ("attn_entropy", "attn_topk_mass", "attn_local_mass", "attn_null_mass")
PATH_METRICS = ("sem_energy_ratio", "geo_energy_ratio")
RANK_METRICS = ("attn_erank", "proj_stable_rank")
ANALYSIS_STREAM = 1_000_081


def parse_indices(text: str, n: int, flag: str, what: str) -> tuple[int, ...]:
    """'0,-1' -> resolved, de-duplicated indices in [0, n); 'all' -> every index."""
    t = str(text).strip().lower()
    if t in ("all", "*"):
        return tuple(range(n))
    out: list[int] = []
    for part in t.split(","):
        part = part.strip()
        try:
            i = int(part)
        except ValueError:
            raise UserError(f"--{flag} {text!r}: {part!r} is not an integer (expected e.g. '0,-1' or 'all')", 2) from None
        if not -n <= i < n:
            raise UserError(f"--{flag} {text!r}: {what} {i} is out of range for a model with {n} {what}s", 2)
        i %= n
        if i not in out:
            out.append(i)
    return tuple(out)


@dataclass(frozen=True)
class AnalysisSpec:
    level: str
    every: int
    max_tokens: int
    layers: tuple[int, ...]
    heads: tuple[int, ...]
    topk: int
    local_window: int
    save_scores: bool

    @property
    def ranks(self) -> bool:
        return self.level in ("medium", "full")

    @property
    def save_matrices(self) -> bool:
        return self.level in ("medium", "full")

    @property
    def save_svals(self) -> bool:
        return self.level == "full"


def spec_for(analysis, eval_every: int, cfg) -> AnalysisSpec | None:
    """The analysis a run's `AnalysisConfig` asks for, or None for `--instrument off` (its values
    were checked when it was built; the layer and head lists are checked against `cfg` here)."""
    if not analysis.enabled:
        return None
    every = int(analysis.every) or int(eval_every or 0) or 100
    return AnalysisSpec(
        level=analysis.instrument, every=every, max_tokens=int(analysis.max_tokens),
        layers=parse_indices(analysis.layers, cfg.n_layer, "analysis-layers", "layer"),
        heads=parse_indices(analysis.heads, cfg.n_head, "analysis-heads", "head"),
        topk=int(analysis.topk), local_window=int(analysis.local_window), save_scores=bool(analysis.save_scores))


def summarise(arrays: dict[str, Any], level: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A pass's arrays (per selected layer x head metrics, maps) -> (the event's scalar means,
    and at level `full` the per-layer lists averaged over the selected heads; the arrays as
    float32 numpy for analysis.h5)."""
    arrays = {k: np.asarray(v, np.float32) for k, v in arrays.items()}
    metrics: dict[str, Any] = {}
    for name in ROW_METRICS + PATH_METRICS + RANK_METRICS:
        if name in arrays:
            metrics[f"{name}_mean"] = float(arrays[name].mean())
            if level == "full":  # per selected layer, averaged over the selected heads
                metrics[f"{name}_by_layer"] = [float(v) for v in arrays[name].mean(axis=-1)]
    return metrics, arrays


def analysis_tokens(val_tokens: np.ndarray, spec: AnalysisSpec, block_size: int, seed: int) -> np.ndarray:
    """The held-out (1, T) sequence every analysis uses: the same one at every step of a run."""
    from dba.data import sample_batch

    t = min(spec.max_tokens, block_size, len(val_tokens) - 1)
    x, _ = sample_batch(val_tokens, 1, t, seed, 0, stream=ANALYSIS_STREAM)
    return x
