"""`dba train`: train a model with JAX, v29's flag names (see train/args.py for every flag).

    dba train                                   # the default recipe -> runs/default
    dba train --data tokens.npy --vocab-size 50257 --attn-mode decoupled --sem-dim 48 ...
    dba train --resume                          # continue runs/default from its last checkpoint
    dba train --out-dir runs/x --resume --steps 5000

Errors in flags or data are one line with exit status 2 (usage) or 1 (runtime); SIGINT/SIGTERM
save the last checkpoint and exit 130/143.
"""

from __future__ import annotations

import os
import sys

from dba.errors import UserError
from train import args as targs

_PLATFORM = {"cpu": "cpu", "gpu": "cuda", "cuda": "cuda", "tpu": "tpu"}
# Flags a resumed run may not change: they define the model, the data or the optimizer state.
_FIXED_ON_RESUME = set(targs.MODEL_FLAGS) | {"data", "data_format", "data_dtype", "tokenizer", "vocab_size",
                                             "val_frac", "seed", "optimizer", "param_dtype", "batch_size",
                                             "grad_accum", "ckpt"}


_NOT_INHERITED = {"resume", "overwrite", "print_config", "device", "live", "mode",
                  "mesh", "coordinator", "num_processes", "process_id"}  # this invocation's hardware


def add_arguments(parser) -> None:
    parser.description = (__doc__ or "").split("\n\n")[0]
    targs.add_arguments(parser)


def _select_platform(device: str) -> None:
    """Pick the JAX platform before JAX initialises a backend."""
    if device == "auto":
        return
    platform = _PLATFORM[device]
    if "jax" in sys.modules:
        import jax

        try:
            jax.config.update("jax_platforms", platform)
        except Exception:  # backends already initialised (in-process callers): keep what exists
            pass
    else:
        os.environ["JAX_PLATFORMS"] = platform


def _command_argv() -> list[str]:
    """The flags after `train` on the command line (for the log and summary)."""
    argv = [a for a in sys.argv[1:] if a != "--debug"]
    return argv[argv.index("train") + 1:] if "train" in argv else argv


def run(args) -> int:
    argv = _command_argv()
    explicit = targs.explicit_flags(args)
    flags = targs.full_flags(explicit)
    if flags["device"] == "mps" or flags["mode"] != "train":
        targs.check_flags(flags)
    _select_platform(flags["device"])
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if flags["device"] in ("auto", "cpu"):
        from train.step import tune_host_malloc

        tune_host_malloc()  # before XLA:CPU starts its threads (see its docstring)
    if not flags["print_config"]:
        from train.distributed import initialize

        # Before anything touches a device (reading a checkpoint to --resume included).
        initialize(flags["coordinator"], flags["num_processes"], flags["process_id"])

    if flags["resume"] and not flags.get("out_dir") and not flags.get("run_tag"):
        out_dir, name = os.path.join(str(flags["run_root"]), "default"), "default"
    else:
        out_dir, name = targs.resolve_out_dir(flags, explicit)

    from pathlib import Path

    from train.loop import clear_run, holds_run, run_training

    out = Path(out_dir)
    resume_meta = None
    if flags["resume"] and not flags["print_config"]:
        from train.checkpointing import RunCheckpoints

        ck = RunCheckpoints(out)
        resume_meta = ck.read_meta("last") if ck.latest_step("last") is not None else None
        ck.close()
        if resume_meta is None:
            print(f"dba train: --resume: {out} holds no checkpoint; starting a new run there", flush=True)
        else:
            saved = dict(resume_meta.get("flags") or {})
            changed = [k for k in explicit if k in _FIXED_ON_RESUME and k in saved and explicit[k] != saved[k]]
            if changed:
                k = changed[0]
                raise UserError(f"--resume: --{k.replace('_', '-')} {explicit[k]!r} differs from the run's "
                                f"{saved[k]!r}; a resumed run keeps its model, data and optimizer", 2)
            # Per-invocation switches are not inherited: a run started with --overwrite or on
            # another device resumes here as asked now.
            base = {k: v for k, v in saved.items() if k not in _NOT_INHERITED}
            flags = targs.full_flags(explicit, base=base)
            flags["resume"] = True
            flags["out_dir"] = str(out)
    targs.check_flags(flags)
    if not flags["print_config"] and holds_run(out) and not flags["resume"]:
        if not flags["overwrite"]:
            raise UserError(f"{out} already holds a run; pass --resume to continue it, --overwrite to replace it, "
                            f"or choose another --out-dir/--run-tag", 2)
        clear_run(out)
    return run_training(flags, explicit, str(out), name, argv, resume_meta)
