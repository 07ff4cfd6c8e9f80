"""`dba train --backend torch` (and `--device mps`, `cuda:N`): the same run as train/run.py's
`Run`, trained by PyTorch on torch_ref's model.

Everything that is not the framework is `Run`'s: the data and batches (train/batches.py, the same
rows for the same seed), the curriculum, evaluation, hooks, the display, `train.jsonl`,
`analysis.png`, `summary.md`, `.safetensors` exports, the stop signals and the non-finite
handling. What differs is here: the step (torch_train/step.py), the resumable training state
(torch_train/checkpoints.py, one `torch_state.pt` per kind, written atomically), the attention
analysis (torch_ref/analysis.py) and the environment record.

Initial weights: with the same `--seed` a torch run starts from the weights the JAX trainer would
draw (jax_model's initialisers, run on the CPU when JAX is installed), so the two frameworks train
the same model from the same batches and their losses agree (parity_tests/test_torch_train_parity.py).
Without JAX, torch's own initialisers (the same distributions) are used, and the log says so.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from typing import Any

from dba.errors import UserError
from train.run import Progress, Run, Throughput
from train.signals import StopSignal

_TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class TorchRun(Run):
    backend_name = "torch"

    def start(self) -> None:
        import torch

        from torch_train.checkpoints import TorchCheckpoints
        from train.distributed import Silent

        c = self.config
        self.device = self.plan.device or "cpu"
        if c.precision.matmul_precision != "high" or "matmul_precision" in c.explicit:
            torch.set_float32_matmul_precision(c.precision.matmul_precision)
        self.env = self._environment()
        self.mesh, self.mesh_shape, self.resharded = None, None, None
        self.process_count, self.main = 1, True
        self.out.mkdir(parents=True, exist_ok=True)
        self.ckpts = TorchCheckpoints(self.out)
        self.stepper = self._build_stepper()
        self.rows = self.stepper.local_rows(int(c.steps.batch_size))
        self.progress = Progress()
        if self.resume_meta is not None:
            self._restore()
        self.log: Any = Silent()
        self._start_display_and_analysis()
        self.stop = StopSignal(shared=False)
        self.hooks = self._default_hooks()
        self._eval_cache: dict[int, tuple] = {}
        self.window = Throughput()
        self.latest = None

    def _environment(self) -> dict[str, Any]:
        import numpy as np
        import torch

        dev = torch.device(self.device)
        if dev.type == "cuda":
            kind = torch.cuda.get_device_name(dev)
        elif dev.type == "mps":
            kind = f"Apple MPS ({platform.machine()})"
        else:
            kind = platform.processor() or platform.machine() or "cpu"
        return {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
                "numpy": np.__version__, "backend": f"torch-{dev.type}", "device": str(dev), "device_count": 1,
                "device_kind": kind, "host_cpus": os.cpu_count()}

    def _build_stepper(self):
        import torch

        from torch_ref.model import DBAModel
        from torch_ref.weights_io import load_canonical
        from torch_train.step import TorchStepper

        c = self.config
        torch.manual_seed(int(c.run.seed))
        model = DBAModel(self.cfg)
        if self.init_state is not None:  # --ckpt
            load_canonical(model, self.init_state, self.init_info["source"])
            self.init_note = None
        elif self.resume_meta is None:
            from train.init_weights import initial_state

            state, self.init_note = initial_state(self.cfg, int(c.run.seed))
            if state is not None:
                load_canonical(model, state, "initial weights")
        else:
            self.init_note = None
        dtype = getattr(torch, _TORCH_DTYPES[c.precision.param_dtype])
        model = model.to(device=self.device, dtype=dtype)
        return TorchStepper(model, c.optim, c.precision, total_steps=int(c.steps.steps), seed=int(c.run.seed),
                            device=self.device, compile=bool(c.recorded.get("compile")),
                            compile_mode=c.recorded.get("compile_mode"))

    def _restore(self) -> None:
        step, meta = self.ckpts.restore("last", self.stepper)
        seen = int(meta.get("skipped_nonfinite") or 0)
        self.stepper.set_nonfinite_count(seen)
        self.progress = Progress(step=step, best_val=meta.get("best_val"), best_step=meta.get("best_step"),
                                 nonfinite_seen=seen, saved_last_at=step)

    def _start_display_and_analysis(self) -> None:
        from train.progress import make_display

        self.display = make_display(self.config.display.live, self.config.steps.steps, self.progress.step)
        self.tb = None
        if self.config.analysis.tb:
            from train.tensorboard import TBWriter

            self.tb = TBWriter(self.out / "tb")
        self.analyzer = self.store = self.analysis_x = None
        self.plot_stale = False
        spec = self.analysis_spec
        if spec is None:
            return
        from dba.analysis_spec import analysis_tokens
        from torch_ref.analysis import Analyzer
        from train.analysis_store import AnalysisStore

        self.analyzer = Analyzer(spec, self.stepper.model)
        self.store = AnalysisStore(self.out / "analysis.h5", save_matrices=spec.save_matrices,
                                   save_svals=spec.save_svals)
        self.analysis_x = analysis_tokens(self.data.val, spec, self.cfg.block_size, self.config.run.seed)

    def device_memory(self) -> dict[str, Any] | None:
        return self.stepper.device_memory()

    def device_text(self) -> str:
        e = self.env
        return f"torch {e['torch']} on {e['device']} ({e['device_kind']})"

    def _announce_mesh(self) -> None:
        if getattr(self, "init_note", None) and self.progress.step == 0:
            self.display.line(f"  {self.init_note}")
        note = getattr(self.stepper, "compile_note", None)
        if note:
            self.display.line(f"  {note}")

    def _compile_longest(self) -> None:
        """Nothing to compile ahead (eager torch; torch.compile compiles on first use)."""

    def save(self, kind: str, step: int, val: float | None = None) -> None:
        """`checkpoints/<kind>/torch_state.pt` (resumable) and `<kind>.safetensors`."""
        self.ckpts.save(kind, step, self.stepper, self.config.run.seed, self.checkpoint_meta(step))
        self.export(kind, step, val)

    def export(self, kind: str, step: int, val: float | None) -> None:
        from dba.weights import save_safetensors

        extra = {"step": str(step), "kind": kind, "run_dir": str(self.out), "trained_with": "torch"}
        if val is not None:
            extra["val_loss"] = repr(float(val))
        if self.data.tokenizer is not None:
            extra["tokenizer"] = json.dumps(self._tokenizer_dict())
        path = self.out / f"{kind}.safetensors"
        try:
            save_safetensors(path, self.cfg, self.stepper.canonical_state(), extra)
        except OSError as e:
            path.with_name(path.name + ".tmp").unlink(missing_ok=True)
            why = os.strerror(e.errno) if e.errno else str(e)
            raise UserError(f"cannot write {path} (step {step}): {why}; the checkpoint of step {step} "
                            f"under {self.ckpts.root / kind} was written", 1) from None
