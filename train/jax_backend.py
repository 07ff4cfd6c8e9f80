"""The JAX side of a `dba train` run (train/run.py's backend): the device mesh, the jitted step
with the optax chain, Orbax checkpoints, the jitted analysis pass and the environment record.

Everything here runs on every process of a multi-host run; `main` (process 0) is the one that
writes the run directory's files. The mesh is checked against the devices when the backend is
made, before anything is built or compiled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dba.errors import UserError
from train.config import RunConfig

_MATMUL_PRECISION = {"highest": "highest", "high": "high", "medium": "bfloat16"}


class JaxBackend:
    name = "jax"

    def __init__(self, config: RunConfig):
        import jax

        from train import sharding
        from train.distributed import is_main

        self.config = config
        p = config.precision
        if p.matmul_precision != "high" or "matmul_precision" in config.explicit:
            jax.config.update("jax_default_matmul_precision", _MATMUL_PRECISION[p.matmul_precision])
        self._env = self._read_environment()  # a platform JAX cannot use: one line, before the mesh
        self.mesh = sharding.make_mesh(config.distributed.mesh_axes)
        self.process_count = jax.process_count()
        if self.mesh.size != jax.device_count() and self.process_count > 1:
            raise UserError(f"{self.process_count} processes need a --mesh over all {jax.device_count()} devices, "
                            f"e.g. --mesh data=-1 (data parallel) or --mesh fsdp=-1 (sharded state)")
        self.mesh_shape = sharding.mesh_shape(self.mesh)
        sharding.check_batch(self.mesh_shape, int(config.steps.batch_size))  # again: a -1 axis is now resolved
        self.main = is_main()
        self.notes: list[str] = []
        if self.mesh.size > 1 or self.process_count > 1:
            ms = self.mesh_shape
            self.notes.append(f"mesh {sharding.mesh_text(ms)} over {self.mesh.size} devices"
                              + (f" on {self.process_count} processes" if self.process_count > 1 else "")
                              + f": batch rows split {sharding.batch_ways(ms)} ways, parameters and optimizer "
                                f"state {ms['fsdp']} ways")

    def environment(self) -> dict[str, Any]:
        return dict(self._env)

    def _read_environment(self) -> dict[str, Any]:
        from train.artifacts import environment

        try:
            return environment()
        except Exception as e:  # e.g. --device gpu without a GPU or without jax[cuda]
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(f"--device {self.config.run.device}: JAX cannot use this platform here ({first}); "
                            f"install the matching jax build (e.g. jax[cuda12]) or use --device cpu", 1) from None

    @staticmethod
    def device_text(env: dict[str, Any]) -> str:
        from train.artifacts import device_line

        return device_line(env)

    @staticmethod
    def checkpoints(out: Path):
        from train.orbax_checkpoints import RunCheckpoints

        return RunCheckpoints(out)

    def build(self, plan) -> Any:
        """The jitted step over the model (with --ckpt's weights) and the optax chain, on the mesh."""
        import jax.numpy as jnp
        from flax import nnx

        from jax_model import DBAModel, load_canonical
        from train.optim import build_optimizer
        from train.step import Stepper

        c = self.config
        dtypes = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}
        model = DBAModel(plan.cfg, rngs=nnx.Rngs(c.run.seed), dtype=dtypes[c.precision.compute_dtype],
                         param_dtype=dtypes[c.precision.param_dtype], remat=bool(c.precision.grad_checkpoint))
        if plan.init_state is not None:
            load_canonical(model, plan.init_state, plan.init_info["source"])
        teacher = None
        if plan.teacher is not None:  # frozen, in its own dtype; sharded like the student by the Stepper
            t_cfg, t_state, t_info = plan.teacher
            t_dtype = dtypes[c.distill.teacher_dtype]
            teacher = load_canonical(DBAModel(t_cfg, dtype=t_dtype, param_dtype=t_dtype), t_state, t_info["source"])
        return Stepper(model, build_optimizer(c.optim, int(c.steps.steps)), seed=c.run.seed, mesh=self.mesh,
                       teacher=teacher, distill=c.distill)

    def restored(self, meta: dict[str, Any]) -> list[str]:
        """Lines about a resumed checkpoint: Orbax restored it onto this run's shardings, whatever
        mesh wrote it."""
        from train import sharding

        saved = (meta.get("devices") or {}).get("mesh")
        if saved and saved != self.mesh_shape:
            return [f"resumed from a checkpoint written on mesh {sharding.mesh_text(saved)}: resharded onto "
                    f"{sharding.mesh_text(self.mesh_shape)}"]
        return []

    def analysis(self, spec, stepper, tokens) -> Any:
        """() -> (metrics, arrays): the jitted analysis pass on the stepper's current parameters,
        over `tokens` placed as a replicated (global) array, so it runs on every process."""
        import jax

        from train.analysis import Analyzer

        analyzer = Analyzer(spec, stepper.graphdef, stepper.rest, stepper.cfg)
        x = jax.device_put(tokens, stepper.replicated)
        return lambda: analyzer(stepper.params, x)
