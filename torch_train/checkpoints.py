"""Checkpoints of a `dba train --backend torch` run: `<out>/checkpoints/last` and `.../best`,
the torch counterpart of train/orbax_checkpoints.py's `RunCheckpoints` (same calls, except that
`save` and `restore` take the `TorchStepper` rather than params and optimizer state).

Each kind is a directory holding two files:

- `torch_state.pt`: torch.save of {"format", "step", "seed", "meta", "state": stepper.state_dict()}
  (model, optimizer moments and update count, non-finite record, loss scale, RNG states): what a
  resumed run needs to continue exactly; read back with `weights_only=True` (no pickled code runs);
- `meta.json`: {"format", "step", "seed", "meta", "state_bytes", "state_mtime_ns", "state_inode"},
  the meta (resolved model config, flags, best val loss, tokenizer) readable without torch.

Crash safety: both files are written to temporary names in the same directory and fsync'd, then
`os.replace`d over the old ones (state first) and the directory fsync'd, so a kill or power cut
mid-save leaves the previous checkpoint. meta.json records the size, mtime and inode of the state
file it belongs to (the new state file is created while the old one still exists: a new inode); if a crash fell between the two renames (new state, old meta) `latest_step` and
`read_meta` notice and read the state file's own copy of the step and meta, so they always
describe the state `restore` returns. Leftover temporary files are removed when a kind is next
used. A failed write (disk full, permissions, quota) is a one-line UserError (exit 1) naming the
checkpoint that is kept.

Test-only fault hooks (`DBA_FAULT`, train/faults.py), as in the Orbax module, acting after every
file of the save is written under its temporary name and before the renames that publish it:
`kill_in_save:K` (SIGKILL), `enospc_in_save:K` (fail with ENOSPC); `kill_after_save:K` SIGKILLs
right after the save of step K is committed. Each fires at the first save at step K, whichever kind.

`dba.run_dir.checkpoint_backend(out_dir)` says which trainer wrote a run directory's training
checkpoint (torch or JAX/Orbax) without importing either framework.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

from dba.errors import UserError
from dba.run_dir import checkpoint_backend  # noqa: F401 (re-exported: its home is dba/run_dir.py)
from train.faults import fault_kill as _fault_kill
from train.faults import fault_points, write_failure

KINDS = ("last", "best")
STATE_FILE = "torch_state.pt"
META_FILE = "meta.json"
FORMAT = 1
_TMP = ".tmp-"


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # platforms that cannot open a directory (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class TorchCheckpoints:
    def __init__(self, out_dir: str | Path):
        self.root = Path(out_dir).resolve() / "checkpoints"
        self._cleaned: set[str] = set()

    def _dir(self, kind: str) -> Path:
        if kind not in KINDS:
            raise ValueError(f"checkpoint kind must be one of {KINDS}, got {kind!r}")
        d = self.root / kind
        if kind not in self._cleaned and d.is_dir():  # leftovers of a save that was killed
            for p in d.iterdir():
                if _TMP in p.name and p.is_file():
                    p.unlink(missing_ok=True)
            self._cleaned.add(kind)
        return d

    # -- reading -----------------------------------------------------------------------------
    def _header(self, kind: str) -> dict[str, Any] | None:
        """{"step", "seed", "meta"} of the kind's checkpoint, or None when there is none: from
        meta.json when it belongs to the state file there, else from the state file itself."""
        d = self._dir(kind)
        state = d / STATE_FILE
        try:
            st = state.stat()
        except FileNotFoundError:
            return None
        try:
            head = json.loads((d / META_FILE).read_text())
            if (head.get("state_bytes"), head.get("state_mtime_ns"), head.get("state_inode")) == (
                    st.st_size, st.st_mtime_ns, st.st_ino):
                return head
        except (FileNotFoundError, ValueError):
            pass
        payload = self._load(kind, "cpu", mmap=True)  # meta.json is stale or missing: the state file decides
        return {"step": int(payload["step"]), "seed": int(payload["seed"]), "meta": payload["meta"]}

    def _load(self, kind: str, device: Any, mmap: bool = False) -> dict[str, Any]:
        import torch

        path = self._dir(kind) / STATE_FILE
        try:
            payload = torch.load(str(path), map_location=device, weights_only=True, mmap=mmap)
        except FileNotFoundError:
            raise UserError(f"no {kind!r} checkpoint under {self.root}", 1) from None
        except Exception as e:
            first = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
            raise UserError(f"cannot read the {kind!r} checkpoint {path}: {first}", 1) from None
        if not isinstance(payload, dict) or not {"step", "seed", "meta", "state"} <= set(payload):
            raise UserError(f"{path} is not a torch training checkpoint of this project", 1)
        return payload

    def latest_step(self, kind: str = "last") -> int | None:
        head = self._header(kind)
        return None if head is None else int(head["step"])

    def read_meta(self, kind: str = "last") -> dict[str, Any] | None:
        head = self._header(kind)
        return None if head is None else dict(head["meta"])

    def unreadable(self, kind: str) -> str | None:
        """Why the kind's checkpoint cannot be read (its state file does not load), or None."""
        try:
            self._load(kind, "cpu", mmap=True)
        except UserError as e:
            return str(e)
        return None

    def restore(self, kind: str, stepper: Any) -> tuple[int, dict[str, Any]]:
        """Load the kind's checkpoint into `stepper` (a TorchStepper: model, optimizer, records,
        RNG states); returns (step, meta)."""
        payload = self._load(kind, stepper.device)
        stepper.load_state_dict(payload["state"])
        return int(payload["step"]), dict(payload["meta"])

    # -- writing -----------------------------------------------------------------------------
    def save(self, kind: str, step: int, stepper: Any, seed: int, meta: dict[str, Any]) -> None:
        """Write the kind's checkpoint of `stepper` at `step`, replacing the previous one only
        once every byte of the new one is on disk."""
        import torch

        step = int(step)
        d = self._dir(kind)
        try:
            previous = self.latest_step(kind)
        except UserError:  # an unreadable old checkpoint of this kind: the new one replaces it
            previous = None
        dev = getattr(stepper, "device", None)
        meta = {**meta, "devices": {"mesh": None, "device_count": 1, "process_count": 1, "backend": "torch",
                                    "platform": getattr(dev, "type", str(dev))}}
        meta = json.loads(json.dumps(meta, default=str))
        tag = f"{_TMP}{os.getpid()}"
        tmp_state, tmp_meta = d / (STATE_FILE + tag), d / (META_FILE + tag)
        try:
            d.mkdir(parents=True, exist_ok=True)
            payload = {"format": FORMAT, "step": step, "seed": int(seed), "meta": meta, "state": stepper.state_dict()}
            with open(tmp_state, "wb") as f:
                torch.save(payload, f)
                f.flush()
                os.fsync(f.fileno())
            st = tmp_state.stat()
            head = {"format": FORMAT, "step": step, "seed": int(seed), "meta": meta,
                    "state_bytes": st.st_size, "state_mtime_ns": st.st_mtime_ns, "state_inode": st.st_ino}
            with open(tmp_meta, "w") as f:
                f.write(json.dumps(head, indent=1, sort_keys=True))
                f.flush()
                os.fsync(f.fileno())
            if step in fault_points("kill_in_save"):  # TEST-ONLY (DBA_FAULT)
                _fault_kill(f"inside the save of step {step}, before the rename of {tmp_state}")
            if step in fault_points("enospc_in_save"):  # TEST-ONLY (DBA_FAULT)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_state))
            os.replace(tmp_state, d / STATE_FILE)
            os.replace(tmp_meta, d / META_FILE)
            _fsync_dir(d)
        except Exception as e:  # only write failures are translated (write_failure), the rest re-raised
            for p in (tmp_state, tmp_meta):
                try:
                    p.unlink(missing_ok=True)
                except OSError:
                    pass
            why = write_failure(e)
            if why is None:
                raise
            kept = (f"the previous {kind!r} checkpoint (step {previous}) is kept" if previous is not None
                    else f"there is no earlier {kind!r} checkpoint")
            raise UserError(f"cannot write the {kind!r} checkpoint of step {step} in {d}: {why}; {kept}", 1) from None
        if step in fault_points("kill_after_save"):  # TEST-ONLY (DBA_FAULT)
            _fault_kill(f"after the {kind!r} checkpoint of step {step} was committed")

    def close(self) -> None:
        """Nothing to release (saves are synchronous); for RunCheckpoints' interface."""
