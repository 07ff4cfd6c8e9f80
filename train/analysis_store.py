"""`analysis.h5`: one HDF5 group per analysis step, safe against a kill at any moment.

Layout of group `step_00000100` (attrs: `step`, every scalar metric, `layers`, `heads`):
- `attn` (Ls, Hs, T, T) fp32: attention over the real keys of the selected layers and heads,
  batch row 0; with null attention `attn_null` (Ls, Hs, T) holds the null key's share, so
  `attn.sum(-1) + attn_null == 1` (without it every `attn` row sums to 1);
- `svals` (Ls, Hs, T) (`--instrument full`): singular values of each `attn` matrix;
- `scores_sem`, `scores_geo` (decoupled) or `scores` (other modes), (Ls, Hs, T, T), with
  `--analysis-save-scores`: the raw score contributions, zero above the diagonal;
- per-(layer, head) metric arrays (Ls, Hs) under `metrics/<name>`.

HDF5 has no journal, so a process killed inside a write can leave a file its library refuses.
Each append therefore goes to a copy (`analysis.h5.tmp`) that is flushed, fsynced and renamed over
`analysis.h5`: the file on disk is always the state after the last completed analysis.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

_MATRICES = ("attn", "attn_null", "scores_sem", "scores_geo", "scores")
_PER_HEAD = ("attn_entropy", "attn_topk_mass", "attn_local_mass", "attn_null_mass", "sem_energy_ratio",
             "geo_energy_ratio", "attn_erank", "proj_stable_rank")


class AnalysisStore:
    def __init__(self, path: str | Path, *, save_matrices: bool, save_svals: bool):
        self.path = Path(path)
        self.save_matrices, self.save_svals = save_matrices, save_svals

    def append(self, step: int, metrics: dict[str, Any], arrays: dict[str, np.ndarray],
               layers: tuple[int, ...], heads: tuple[int, ...]) -> None:
        import h5py

        tmp = self.path.with_name(self.path.name + ".tmp")
        if self.path.exists():
            shutil.copyfile(self.path, tmp)
        elif tmp.exists():
            tmp.unlink()
        with h5py.File(tmp, "a") as f:
            name = f"step_{int(step):08d}"
            if name in f:  # a resumed run re-analyses a step it had reached before the kill
                del f[name]
            g = f.create_group(name)
            g.attrs["step"] = int(step)
            g.attrs["layers"] = np.asarray(layers, np.int32)
            g.attrs["heads"] = np.asarray(heads, np.int32)
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    g.attrs[k] = v
            if self.save_matrices:
                for k in _MATRICES:
                    if k in arrays:
                        g.create_dataset(k, data=arrays[k], compression="gzip", compression_opts=1)
            if self.save_svals and "svals" in arrays:
                g.create_dataset("svals", data=arrays["svals"])
            m = g.create_group("metrics")
            for k in _PER_HEAD:
                if k in arrays and k != "proj_stable_rank":
                    m.create_dataset(k, data=arrays[k])
            if "proj_stable_rank" in arrays:  # (Ls, n_q_projections)
                m.create_dataset("proj_stable_rank", data=arrays["proj_stable_rank"])
            f.flush()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)


def read_steps(path: str | Path) -> list[int]:
    """The analysis steps stored in an analysis.h5, in order."""
    import h5py

    with h5py.File(path, "r") as f:
        return sorted(int(f[k].attrs["step"]) for k in f)
