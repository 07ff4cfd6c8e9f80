"""`dba train`: train a model with JAX or PyTorch, v29's flag names (see train/args.py for every flag).

    dba train                                   # the default recipe -> runs/default
    dba train --device mps                      # PyTorch on a Mac (also --backend torch: cpu, cuda, cuda:N)
    dba train --data tokens.npy --vocab-size 50257 --attn-mode decoupled --sem-dim 48 ...
    dba train --resume                          # continue runs/default from its last checkpoint
    dba train --out-dir runs/x --resume --steps 5000

Errors in flags or data are one line with exit status 2 (usage) or 1 (runtime); SIGINT/SIGTERM
save the last checkpoint and exit 130/143.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
from pathlib import Path
from typing import Any

from dba.config import PAPER_ALL, PAPER_EXPERIMENTS
from dba.errors import UserError
from train import args as targs
from train.config import JAX_DEVICES

def add_arguments(parser) -> None:
    parser.description = (__doc__ or "").split("\n\n")[0]
    targs.add_arguments(parser)


def _command_argv() -> list[str]:
    """The flags after `train` on the command line (for the log and summary)."""
    argv = [a for a in sys.argv[1:] if a != "--debug"]
    return argv[argv.index("train") + 1:] if "train" in argv else argv


def _resume_meta(out: Path, backend: str) -> dict[str, Any] | None:
    """The meta of the run's last checkpoint (written by `backend`), or None when there is none."""
    if backend == "torch":
        from torch_train.checkpoints import TorchCheckpoints

        ck = TorchCheckpoints(out)
        try:
            return ck.read_meta("last") if ck.latest_step("last") is not None else None
        finally:
            ck.close()
    from train.orbax_checkpoints import RunCheckpoints

    ck = RunCheckpoints(out)
    try:
        return ck.read_meta("last") if ck.latest_step("last") is not None else None
    finally:
        ck.close()


def _resumed_flags(explicit: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """The saved run's flags that this invocation inherits; a typed flag that would change the
    model, the data or the optimizer state is a usage error."""
    saved = targs.saved_flags(meta.get("flags") or {})
    changed = [k for k in explicit if k in targs.FIXED_ON_RESUME and k in saved and explicit[k] != saved[k]]
    if changed:
        k = changed[0]
        raise UserError(f"--resume: --{k.replace('_', '-')} {explicit[k]!r} differs from the run's "
                        f"{saved[k]!r}; a resumed run keeps its model, data and optimizer", 2)
    if "tokenizer" in meta and meta["tokenizer"] is None:
        # A run that recorded no tokenizer trained on token ids without one (runs before the
        # flag's default became None saved 'byte' there): keep recording none.
        saved["tokenizer"] = None
    # Per-invocation switches are not inherited: a run started with --overwrite or on another
    # device resumes here as asked now.
    return {k: v for k, v in saved.items() if k not in targs.NOT_INHERITED}


def _check_torch_flags(config) -> None:
    """Flags the PyTorch trainer cannot honour: a one-line error instead of a silent difference."""
    d = config.distributed
    for flag, value in (("mesh", d.mesh), ("coordinator", d.coordinator), ("num_processes", d.num_processes)):
        if value is not None:
            raise UserError(f"--{flag.replace('_', '-')} is for the JAX trainer (device meshes, several hosts); "
                            f"the PyTorch trainer runs on one device: drop it or use --backend jax", 2)


def run(args) -> int:
    if getattr(args, "exp", None) == PAPER_ALL:
        return _run_paper_all(args)
    argv = _command_argv()
    explicit = targs.explicit_flags(args)
    config = targs.run_config(explicit)  # every flag checked before anything runs
    _say_data(config)
    from train.backends import choose_backend

    backend, note = choose_backend(config.run)
    out, name = _out_dir(config)
    if config.ckpt.resume and not config.run.print_config:
        from dba.run_dir import checkpoint_backend

        written_by = checkpoint_backend(out)  # read without starting either framework
        if written_by is not None and written_by != backend:
            if "backend" in explicit:
                raise UserError(f"--resume: {out} was trained with {written_by}; its training state resumes "
                                f"with --backend {written_by} (its weights load in either framework)", 2)
            if written_by == "jax" and config.run.device not in JAX_DEVICES:
                raise UserError(f"--resume: {out} was trained with JAX, which cannot use --device "
                                f"{config.run.device}", 2)
            backend, note = written_by, f"resuming a run trained with {written_by}"
    if backend == "torch":
        _check_torch_flags(config)
    if not (config.ckpt.resume or config.run.print_config
            or {"amp", "param_dtype", "amp_dtype"} & set(explicit)):  # a precision the flags did not choose
        note = "; ".join(n for n in (note, cpu_precision_note(config.run, backend)) if n) or None
    return _run(config, explicit, argv, backend, note, out, name)


def cpu_precision_note(run, backend: str) -> str | None:
    """For the first log line of a run on a CPU with bf16 matrix units whose flags did not choose
    a precision (the caller checks that): which precision the framework that trains runs faster
    here. torch: a bf16 matmul timed against an fp32 one (torch_train/precision.py); JAX: XLA:CPU
    has no bf16 matrix path (with every XLA flag of the pinned jaxlib a bf16 matmul ran slower than
    fp32), so fp32."""
    from dba.resources import bf16_matrix_units

    units = bf16_matrix_units()
    if units is None or run.device not in ("auto", "cpu"):
        return None
    if backend == "jax":
        if run.device == "auto" and os.path.exists("/dev/nvidiactl"):  # JAX may train on a GPU
            return None
        return (f"this CPU has bf16 matrix units ({units}), which XLA:CPU does not use: fp32 (the default) is "
                "JAX's faster precision here; --backend torch --amp --compile uses them")
    from torch_train import precision

    if not precision.runs_on_cpu(run.device):
        return None
    r = precision.bf16_speedup()
    if r < 1.2:
        return f"this CPU has bf16 matrix units ({units}), but a bf16 matmul ran only {r:.1f}x fp32's here: fp32"
    return (f"this CPU has bf16 matrix units ({units}): a bf16 matmul ran {r:.1f}x fp32's here, so --amp "
            "(bf16 autocast, fp32 weights) trains faster, with --compile faster still; fp32 as the flags say")


def _out_dir(config) -> tuple[Path, str]:
    """(run directory, run name)."""
    out_dir, name = config.out_dir(targs.PRESENTATION_FLAGS)
    return Path(out_dir), name


def _run(config, explicit: dict[str, Any], argv: list[str], backend: str, note: str | None, out: Path,
         name: str) -> int:
    from train.run import RunPlan, train

    plan = None
    if not config.ckpt.resume and not config.run.print_config:
        # A new run's plan (data, model, --ckpt, teacher) is framework-free: its mistakes are
        # reported before a framework starts (seconds saved on every refused command).
        plan = RunPlan(config, None, framework=backend, framework_note=note)
    if backend == "jax":
        from jax_model.devices import select_platform

        select_platform(config.run.device)
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        if config.run.device in ("auto", "cpu"):
            from train.step import tune_host_malloc

            tune_host_malloc()  # before XLA:CPU starts its threads (see its docstring)
    d = config.distributed
    if not config.run.print_config and backend == "jax":
        from train.distributed import initialize

        # Before anything touches a device (reading a checkpoint to --resume included).
        initialize(d.coordinator, d.num_processes, d.process_id)

    from dba.run_dir import clear_run, holds_run

    if config.run.print_config:
        RunPlan(config, framework=backend, framework_note=note, device=config.run.device).print_config(out)
        return 0
    from dba.run_dir import RunDirLock
    from train.distributed import process_count

    if process_count() == 1:
        RunDirLock(out).check_free()  # a directory in use: refused before anything is read
    resume_meta = None
    if config.ckpt.resume:  # read-only: the run's last checkpoint, if any
        resume_meta = _resume_meta(out, backend)
        if resume_meta is None:
            print(f"dba train: --resume: {out} holds no checkpoint; starting a new run there", flush=True)
        else:
            config = targs.run_config(explicit, base=_resumed_flags(explicit, resume_meta),
                                      implied={"resume": True, "out_dir": str(out)})
    device = None
    if backend == "torch":
        try:
            from torch_ref.devices import torch_device
        except ImportError:
            raise UserError("--backend torch needs PyTorch: pip install torch (see the README's set-up)", 1) from None
        device = str(torch_device(config.run.device))  # a device this machine lacks: one line, nothing written
    _check_not_held(out, config)
    # data, model, analysis: mistakes here write nothing
    if plan is None:
        plan = RunPlan(config, resume_meta, framework=backend, framework_note=note, device=device)
    plan.device = device
    # A generated (timestamped) name is never shared: a run started in the same second gets -2.
    generated = config.name_is_generated(targs.PRESENTATION_FLAGS)
    lock = _lock(out, generated)  # held until the run ends: a second `dba train` here is refused
    try:
        out, name = (lock.dir, lock.dir.name) if generated else (out, name)
        _check_not_held(out, config)  # again, now that no other run can be writing it
        if holds_run(out) and not config.ckpt.resume:
            clear_run(out)  # --overwrite
        if backend == "torch":
            from torch_train.backend import TorchBackend

            return train(plan, TorchBackend(config, device), out_dir=out, name=name, argv=argv)
        from train.jax_backend import JaxBackend

        return train(plan, JaxBackend(config), out_dir=out, name=name, argv=argv)
    finally:
        lock.release(discard=True)  # a run that wrote nothing leaves no directory behind


def _check_not_held(out: Path, config) -> None:
    from dba.run_dir import holds_run

    if holds_run(out) and not config.ckpt.resume and not config.ckpt.overwrite:
        raise UserError(f"{out} already holds a run; pass --resume to continue it, --overwrite to replace it, "
                        f"or choose another --out-dir/--run-tag", 2)


def _lock(out: Path, new_name: bool):
    """The run directory's lock (dba/run_dir.py), taken by the writer process (process 0) only;
    with several processes all of them stop when it cannot be taken."""
    from dba.run_dir import RunDirLock
    from train.distributed import agree, is_main, process_count

    if new_name and process_count() > 1:
        raise UserError("a multi-host run needs a fixed run directory on the shared filesystem: "
                        "pass --out-dir or --run-tag", 2)
    lock, refused = RunDirLock(out, new_name=new_name), None
    if is_main():
        try:
            lock.acquire()
        except UserError as e:
            refused = e
    if process_count() > 1 and agree(int(refused is not None)) and refused is None:
        raise UserError(f"run directory {str(out)!r} is in use: process 0 could not lock it", 1)
    if refused is not None:
        raise refused
    return lock


def _say_data(config) -> None:
    """How the data file is read, where the flags do not make it evident (a sniffed .txt, a
    tokenizer recorded with token ids): the run's first line (stderr under --print-config)."""
    from dba.data import describe_data

    d = config.data
    note = describe_data(d.path, d.format, d.tokenizer)
    if note:
        print(f"dba train: {note}", file=sys.stderr if config.run.print_config else sys.stdout, flush=True)


def _run_paper_all(args) -> int:
    """v29's `--exp paper_all`: the four paper presets trained one after another, each in its own
    run directory <run-root>/[<size>_]<exp>[_<run-tag>]; stops at the first that fails. Every
    run's flags are checked before the first one trains. --print-config prints a JSON list."""
    explicit = targs.explicit_flags(args)
    for flag in ("out_dir", "ckpt"):
        if explicit.get(flag) is not None:
            raise UserError(f"--exp {PAPER_ALL} trains four models, each in its own run directory "
                            f"(<run-root>/<size>_<exp>): drop --{flag.replace('_', '-')}", 2)
    runs = [argparse.Namespace(**dict(vars(args), exp=exp)) for exp in PAPER_EXPERIMENTS]
    for one in runs:
        config = targs.run_config(targs.explicit_flags(one))
        if not config.run.print_config:  # a run directory already taken: refused before any run
            _check_not_held(Path(config.out_dir(targs.PRESENTATION_FLAGS)[0]), config)
    if explicit.get("print_config"):
        configs = []
        for one in runs:
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                run(one)
            configs.append(json.loads(buf.getvalue()))
        print(json.dumps(configs, indent=2, sort_keys=True))
        return 0
    for i, one in enumerate(runs):
        print(f"dba train: --exp {PAPER_ALL}: run {i + 1} of {len(runs)}, --exp {one.exp}", flush=True)
        not_run = ", ".join(r.exp for r in runs[i + 1:]) or "none"
        try:
            code = run(one)
        except UserError as e:
            raise UserError(f"--exp {PAPER_ALL}: {one.exp}: {e} (not run: {not_run})", e.code) from None
        if code:
            print(f"dba train: --exp {PAPER_ALL} stopped: {one.exp} exited with {code} (not run: {not_run})",
                  file=sys.stderr, flush=True)
            return code
    return 0
