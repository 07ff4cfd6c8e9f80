"""Orbax checkpoints of a run: `<out>/checkpoints/last` and `<out>/checkpoints/best`.

Each is an Orbax `CheckpointManager` (keeps the newest one) whose items are `state` (params,
optimizer state, step, seed — restored exactly, so a resumed run continues bit for bit) and
`meta` (JSON: the resolved model config, flags, best val loss, tokenizer). Orbax writes to a
temporary directory and renames it, so a kill mid-save leaves the previous checkpoint intact.
Saves are synchronous: the train step donates its buffers, so nothing may read them later.

Sharded state (`--mesh`): every process writes the shards its devices hold, in parallel, and
Orbax records the global shapes; `meta["devices"]` records the mesh, device count and platform
that wrote it. `restore` reads onto the shardings of the templates it is given, so a checkpoint
written on one mesh resumes on another mesh or on a single device (Orbax reshards on read).

Whenever a checkpoint is written, the matching weights-only export (`last.safetensors` /
`best.safetensors`, config in the metadata) is written beside it, for torch_ref.load(run_dir)
and jax_model.load(run_dir) on machines without Orbax.

Crash safety: Orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it to `<step>`
only when every file is written (then drops the older step), so a SIGKILL or power cut mid-save
leaves the previous checkpoint as the latest; steps are found by name, so a leftover temporary
directory is never restored, and it is removed when the manager next opens
(`cleanup_tmp_directories`) or when that step is saved again. A failed write (disk full,
permissions, quota) is a one-line UserError (exit 1) naming the checkpoint that is kept.
A resumed run that reaches a step an interrupted run had already saved (e.g. a 'best' committed
just before a kill) replaces it.

Test-only fault hooks (`DBA_FAULT`, train/step.py `fault_points`), acting inside Orbax's own
commit, after the step's files are written to the temporary directory and before the rename:
`kill_in_save:K` (SIGKILL this process), `enospc_in_save:K` (fail with ENOSPC, as a full disk
would); and `kill_after_save:K` (SIGKILL right after the save at step K committed). Each fires
at the first save at step K, whichever kind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
from pathlib import Path
from typing import Any

import jax

from dba.errors import UserError
from train.faults import fault_kill as _fault_kill
from train.faults import fault_points, write_failure

KINDS = ("last", "best")


def _quiet_orbax() -> None:
    for name in ("absl", "orbax", "orbax.checkpoint"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    except Exception:  # absl is optional
        pass


class RunCheckpoints:
    def __init__(self, out_dir: str | Path):
        import orbax.checkpoint as ocp

        _quiet_orbax()
        self.ocp = ocp
        self.root = Path(out_dir).resolve() / "checkpoints"
        self._mngr: dict[str, Any] = {}

    def _manager(self, kind: str):
        if kind not in self._mngr:
            ocp = self.ocp
            opts = ocp.CheckpointManagerOptions(max_to_keep=1, create=True,
                                                enable_async_checkpointing=False,
                                                cleanup_tmp_directories=True)
            self._mngr[kind] = ocp.CheckpointManager(self.root / kind, options=opts)
        return self._mngr[kind]

    def latest_step(self, kind: str = "last") -> int | None:
        if not (self.root / kind).is_dir():
            return None
        return self._manager(kind).latest_step()

    def save(self, kind: str, step: int, stepper: Any, seed: int, meta: dict[str, Any]) -> None:
        """The kind's checkpoint of `stepper` (train/step.py's Stepper: its params and optimizer
        state) at `step`."""
        ocp = self.ocp
        state = {"params": stepper.params, "opt_state": stepper.opt_state, "step": int(step), "seed": int(seed)}
        meta = {**meta, "devices": device_info(stepper.params)}
        mngr = self._manager(kind)
        previous = mngr.latest_step()
        try:
            if int(step) in mngr.all_steps():  # saved by an interrupted run that reached this step
                mngr.delete(int(step))
                previous = mngr.latest_step()
            with _fault_hooks(int(step)):
                mngr.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                              meta=ocp.args.JsonSave(json.loads(json.dumps(meta)))),
                          force=True)
                mngr.wait_until_finished()
        except Exception as e:  # noqa: BLE001 (only write failures are translated; see write_failure)
            why = write_failure(e)
            if why is None:
                raise
            kept = (f"the previous {kind!r} checkpoint (step {previous}) is kept" if previous is not None
                    else f"there is no earlier {kind!r} checkpoint")
            raise UserError(f"cannot write the {kind!r} checkpoint of step {step} in {self.root / kind}: {why}; "
                            f"{kept}", 1) from None
        if int(step) in fault_points("kill_after_save"):  # TEST-ONLY (DBA_FAULT)
            _fault_kill(f"after the {kind!r} checkpoint of step {step} was committed")

    def read_meta(self, kind: str = "last") -> dict[str, Any] | None:
        step = self.latest_step(kind)
        if step is None:
            return None
        ocp = self.ocp
        out = self._manager(kind).restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    def unreadable(self, kind: str) -> str | None:
        """Why the kind's checkpoint cannot be read (its meta does not restore), or None."""
        try:
            self.read_meta(kind)
        except Exception as e:  # noqa: BLE001 (any failure to read is the answer)
            return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        return None

    def restore(self, kind: str, stepper: Any) -> tuple[int, dict[str, Any]]:
        """Load the kind's checkpoint into `stepper` (params and optimizer state, read straight onto
        the stepper's shardings, whatever mesh wrote them); returns (step, meta)."""
        params, opt_state, step, meta = self.restore_state(kind, stepper.params, stepper.opt_state)
        stepper.set_state(params, opt_state)
        return step, meta

    def restore_state(self, kind: str, params_like: Any, opt_state_like: Any) -> tuple[Any, Any, int, dict[str, Any]]:
        """(params, opt_state, step, meta) restored into the structure, dtypes and shardings of
        the given templates (arrays, or jax.ShapeDtypeStruct with a sharding)."""
        ocp = self.ocp
        step = self.latest_step(kind)
        if step is None:
            raise UserError(f"no {kind!r} checkpoint under {self.root}", 1)
        abstract = {"params": params_like, "opt_state": opt_state_like, "step": 0, "seed": 0}
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract)
        try:
            out = self._manager(kind).restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        except (ValueError, KeyError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"cannot restore the {kind!r} checkpoint in {self.root} into this run "
                            f"(did the model or optimizer change?): {first}", 1) from None
        st = out["state"]
        return st["params"], st["opt_state"], int(st["step"]), dict(out["meta"])

    def close(self) -> None:
        for m in self._mngr.values():
            # let the removal of leftover temporary directories (started when the manager opened)
            # finish, so a run that saves nothing still leaves a clean directory
            await_cleanup = getattr(m, "_maybe_await_cleanup_tmp_directory", None)
            if await_cleanup is not None:
                await_cleanup()
            m.close()
        self._mngr.clear()


@contextlib.contextmanager
def _fault_hooks(step: int):
    """TEST-ONLY (DBA_FAULT kill_in_save / enospc_in_save): for this save, make Orbax's commit of
    the temporary directory kill the process or fail with ENOSPC first, i.e. after every file of
    the checkpoint has been written and before the rename that publishes it."""
    kill, enospc = step in fault_points("kill_in_save"), step in fault_points("enospc_in_save")
    if not (kill or enospc):
        yield
        return
    from orbax.checkpoint._src.path import atomicity

    classes = [c for c in (getattr(atomicity, "AtomicRenameTemporaryPath", None),
                           getattr(atomicity, "CommitFileTemporaryPath", None)) if c is not None]
    originals = {c: c.__dict__["finalize"] for c in classes}

    def hooked(original):
        async def finalize(self, *args, **kwargs):
            if self.get_final().name == str(step):  # the step directory, after its items committed
                if kill:
                    _fault_kill(f"inside the save of step {step}, before Orbax's commit of {self.get()}")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.get()))
            return await original(self, *args, **kwargs)

        return finalize

    for c in classes:
        c.finalize = hooked(originals[c])
    try:
        yield
    finally:
        for c, f in originals.items():
            c.finalize = f


def device_info(params: Any) -> dict[str, Any]:
    """Where a state lives: the mesh of its (first) NamedSharding, the devices it spans, the
    platform and the number of processes."""
    mesh, n = None, 1
    for leaf in jax.tree.leaves(params):
        m = getattr(getattr(leaf, "sharding", None), "mesh", None)
        if m is not None and hasattr(m, "shape"):
            mesh, n = {str(k): int(v) for k, v in m.shape.items()}, int(m.size)
            break
    return {"mesh": mesh, "device_count": n, "platform": jax.default_backend(),
            "process_count": jax.process_count()}
