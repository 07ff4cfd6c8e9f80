"""The PyTorch side of a `dba train` run (`--backend torch`, and `--device mps`, `cuda:N`):
train/run.py's loop with torch_ref's model, torch_train/step.py's step, torch_state.pt
checkpoints (torch_train/checkpoints.py) and torch_ref/analysis.py's pass.

Everything that is not the framework is the loop's: the data and batches (train/batches.py, the
same rows for the same seed), the curriculum, evaluation, hooks, the display, `train.jsonl`,
`analysis.png`, `summary.md`, `.safetensors` exports, the stop signals and the non-finite
handling. One process, one device.

Initial weights: with the same `--seed` a torch run starts from the weights the JAX trainer would
draw (jax_model's initialisers, run on the CPU when JAX is installed), so the two frameworks train
the same model from the same batches and their losses agree (parity_tests/test_torch_train_parity.py).
Without JAX, torch's own initialisers (the same distributions) are used, and the log says so.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any

from dba.resources import cpu_name, platform_text
from train.config import RunConfig

_TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class TorchBackend:
    name = "torch"
    main = True  # one process, which writes the run directory
    process_count = 1
    mesh_shape = None

    def __init__(self, config: RunConfig, device: str):
        import torch

        self.config, self.device = config, device
        p = config.precision
        if p.matmul_precision != "high" or "matmul_precision" in config.explicit:
            torch.set_float32_matmul_precision(p.matmul_precision)
        self.notes: list[str] = []

    def environment(self) -> dict[str, Any]:
        import numpy as np
        import torch

        dev = torch.device(self.device)
        if dev.type == "cuda":
            kind = torch.cuda.get_device_name(dev)
        elif dev.type == "mps":
            kind = f"Apple MPS ({platform.machine()})"
        else:
            kind = cpu_name()
        return {"python": sys.version.split()[0], "platform": platform_text(), "torch": torch.__version__,
                "numpy": np.__version__, "backend": f"torch-{dev.type}", "device": str(dev), "device_count": 1,
                "device_kind": kind, "host_cpus": os.cpu_count()}

    @staticmethod
    def device_text(env: dict[str, Any]) -> str:
        return f"torch {env['torch']} on {env['device']} ({env['device_kind']})"

    @staticmethod
    def checkpoints(out: Path):
        from torch_train.checkpoints import TorchCheckpoints

        return TorchCheckpoints(out)

    def build(self, plan) -> Any:
        """torch_ref's model (--ckpt's weights, or the JAX trainer's draw for the seed) in the
        parameter dtype on the device, and the step with torch_ref's optimizer."""
        import torch

        from torch_ref.model import DBAModel
        from torch_ref.weights_io import load_canonical
        from torch_train.step import TorchStepper

        c = self.config
        torch.manual_seed(int(c.run.seed))
        model = DBAModel(plan.cfg)
        if plan.init_state is not None:  # --ckpt
            load_canonical(model, plan.init_state, plan.init_info["source"])
        elif plan.resume_meta is None:
            from train.init_weights import initial_state

            state, note = initial_state(plan.cfg, int(c.run.seed))
            if state is not None:
                load_canonical(model, state, "initial weights")
            if note:
                self.notes.append(note)
        model = model.to(device=self.device, dtype=getattr(torch, _TORCH_DTYPES[c.precision.param_dtype]))
        teacher = None
        if plan.teacher is not None:  # frozen, in its own dtype, on the student's device
            t_cfg, t_state, t_info = plan.teacher
            teacher = DBAModel(t_cfg)
            load_canonical(teacher, t_state, t_info["source"])
            teacher = teacher.to(device=self.device, dtype=getattr(torch, _TORCH_DTYPES[c.distill.teacher_dtype]))
        stepper = TorchStepper(model, c.optim, c.precision, total_steps=int(c.steps.steps), seed=int(c.run.seed),
                               device=self.device, compile=bool(c.recorded.get("compile")),
                               compile_mode=c.recorded.get("compile_mode"), teacher=teacher, distill=c.distill)
        if stepper.compile_note:
            self.notes.append(stepper.compile_note)
        return stepper

    @staticmethod
    def restored(meta: dict[str, Any]) -> list[str]:
        return []

    @staticmethod
    def analysis(spec, stepper, tokens) -> Any:
        """() -> (metrics, arrays): torch_ref/analysis.py's pass on the live model."""
        from torch_ref.analysis import Analyzer

        analyzer = Analyzer(spec, stepper.model)
        return lambda: analyzer(None, tokens)
