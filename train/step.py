"""Jitted train and eval steps over a split NNX model (params + optimizer state as pytrees).

One optimizer step = `grad_accum` micro-batches, looped with `jax.lax.scan` inside ONE jitted
function, so there is one compile per sequence length (jit caches by shape) whatever the
accumulation. Gradients are averaged in fp32, clipped and applied by the optax chain from
train/optim.py. Params and optimizer state are donated, so the step updates them in place.

`Stepper` holds the state and counts traces: `trace_count` is incremented in the Python body of
the jitted function, which only runs when JAX traces (i.e. compiles) a new shape.

Non-finite steps: a step whose loss or global gradient norm is not finite applies no update
(parameters and optimizer state stay exactly as they were, selected inside the jitted step, so
no host sync is added) and is counted in `Stepper.faults`, a small device-side record (count and
the last `FAULT_RING` bad steps) the loop reads at the points where it syncs anyway; the loop
decides whether to go on (`--skip-nonfinite`) or stop.

Memory: every compile reads the executable's memory estimate (`compiled.memory_analysis()`) and
refuses, with a one-line UserError, a step that cannot fit the device (`device_memory_limit`).

Test-only fault hooks (`DBA_FAULT`, see `fault_points`): `nan_loss_at:K` / `nan_grad_at:K` make
the loss / the gradients of step K (1-based, as logged) NaN inside the jitted step, so the
non-finite handling can be tested deterministically. Unset, they add nothing to the step.
"""

from __future__ import annotations

import os
import sys
import time
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dba.errors import UserError
from dba.resources import host_memory_bytes
from dba.units import human_bytes
from jax_model.model import DBAModel
from train import sharding
from train.faults import (  # noqa: F401 (re-exported: other modules import them from here)
    FAULT_ENV,
    FAULT_RING,
    NONFINITE_GRAD,
    NONFINITE_LOSS,
    fault_points,
    nonfinite_kind_text,
)
from train.distill import PHASES, attention_io, blockwise_mask, blockwise_mse, kd_terms
from train.grad_norms import group_grad_norms
from train.optim import _find_hparams

_MALLOC_TUNED: bool | None = None

def device_memory_limit(device: Any) -> int | None:
    """Bytes the train step may use on `device`: the allocator's `bytes_limit` where the platform
    reports one (GPU, TPU); on CPU the host memory (`host_memory_bytes`, shared by all CPU
    devices of the process); None where unknown (then nothing is checked)."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 (platforms without allocator stats)
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    if getattr(device, "platform", None) == "cpu":
        return host_memory_bytes()
    return None


def compiled_memory_bytes(compiled: Any) -> int | None:
    """Per-device bytes a compiled executable needs: arguments + outputs - outputs aliased to
    (donated) arguments + temporaries + generated code; None where XLA gives no analysis."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        return None
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
               + m.temp_size_in_bytes + getattr(m, "generated_code_size_in_bytes", 0))


def tune_host_malloc() -> bool:
    """Make glibc keep and reuse the host memory of XLA:CPU's per-step buffers.

    Each train step allocates several hundred MB of temporaries (the (B*T, V) logits alone are
    64 MB on config A) and frees them at the end. glibc serves blocks over its mmap threshold
    (<= 32 MB) with fresh mmaps, and XLA's worker threads allocate from per-thread arenas whose
    heaps cannot hold them, so every step page-faults all that memory in again (~150k faults,
    ~25% of the step on a 2-core CPU). One arena, no mmap for big blocks and no trimming makes
    the second step onwards reuse the same pages: 730 -> 560 ms per step on config A.

    Must run before JAX starts its CPU backend (threads keep the arena they first allocated
    from), so call it first thing in a training entry point. Process-wide: freed memory stays
    with the process (RSS holds at its peak). A no-op returning False off glibc, when
    DBA_NO_MALLOC_TUNING is set, or when it fails; idempotent.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED is not None:
        return _MALLOC_TUNED
    _MALLOC_TUNED = False
    if os.environ.get("DBA_NO_MALLOC_TUNING") or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8  # glibc <malloc.h>
        big = 2**31 - 1  # mallopt takes an int
        ok = (libc.mallopt(m_arena_max, 1) == 1 and libc.mallopt(m_mmap_threshold, big) == 1
              and libc.mallopt(m_trim_threshold, big) == 1)
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        ok = False
    _MALLOC_TUNED = bool(ok)
    return _MALLOC_TUNED


def _reseed(rest: Any, key: jax.Array) -> Any:
    """Fresh dropout keys for one micro-batch (derived from `key`), counts reset to 0."""
    leaves, treedef = jax.tree.flatten(rest)
    out = []
    for i, leaf in enumerate(leaves):
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            out.append(jax.random.fold_in(key, i))
        else:
            out.append(jnp.zeros_like(leaf))
    return jax.tree.unflatten(treedef, out)


class Stepper:
    """Train/eval steps for `model` with optimizer `tx`.

    `train_step(x_ABT, y_ABT, step)` takes A = grad_accum micro-batches (int32 (A, B, T)) and
    returns device metrics {loss, grad_norm, lr, grad_norm_<group>...} without syncing; `eval_loss(X_NBT, Y_NBT)`
    returns the mean loss over N batches (one call, one compile per shape).

    On a `mesh` (train/sharding.py; default one device) parameters and optimizer state are laid
    out by the sharding rules and batches split along B; `put_batch` turns this process's rows
    into the global array the step takes.
    """

    def __init__(self, model: DBAModel, tx: optax.GradientTransformation, *, seed: int = 0,
                 donate: bool = True, opt_state: Any = None, mesh: Any = None, teacher: DBAModel | None = None,
                 distill: Any = None):
        """`teacher` and `distill` (a DistillConfig): the frozen model the step distils from
        (train/distill.py); its parameters are sharded like the student's and passed to the step."""
        self.tx = tx
        self.seed = int(seed)
        # One code path for one device and many: no mesh = a 1 x 1 mesh over the first device.
        self.mesh = mesh if mesh is not None else sharding.make_mesh({})
        self.graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        mlp = model.cfg.mlp
        self.param_sharding = sharding.tree_shardings(params, self.mesh, mlp)
        self.opt_sharding = sharding.tree_shardings(jax.eval_shape(tx.init, params), self.mesh, mlp)
        self.batch_sharding = sharding.batch_sharding(self.mesh)
        self.replicated = sharding.replicated(self.mesh)
        self.params = jax.device_put(params, self.param_sharding)
        self.rest = jax.device_put(rest, self.replicated)  # dropout RNG state, closed over by the step
        # Initialised in place, already sharded (no full copy of the optimizer state on one device).
        self.opt_state = (jax.jit(tx.init, out_shardings=self.opt_sharding)(self.params) if opt_state is None
                          else jax.device_put(opt_state, self.opt_sharding))
        self.cfg = model.cfg
        self.dropout = model.cfg.dropout > 0
        self.decoupled = model.cfg.attn_mode == "decoupled"
        self.trace_count = 0  # train-step traces (= compiles): one per distinct shape
        self.eval_trace_count = 0
        self.compile_s = 0.0
        self._compiled: dict[tuple, Any] = {}
        self.memory_bytes: dict[tuple, int] = {}  # compiled estimate per batch shape
        self.memory_limit: int | None = None
        self.faults = self._fault_record(0)
        self.distill = distill if teacher is not None else None
        if teacher is not None:
            self.t_graphdef, t_params, t_rest = nnx.split(teacher, nnx.Param, ...)
            self.t_sharding = sharding.tree_shardings(t_params, self.mesh, teacher.cfg.mlp)
            self.t_params = jax.device_put(t_params, self.t_sharding)
            self.t_rest = jax.device_put(t_rest, self.replicated)
            self.update_mask = blockwise_mask(self.params)
        else:
            self.t_params, self.t_sharding = {}, self.replicated
        # TEST-ONLY hooks (DBA_FAULT): steps (1-based) whose loss / gradients are made NaN.
        self._nan_loss_at = sorted(fault_points("nan_loss_at"))
        self._nan_grad_at = sorted(fault_points("nan_grad_at"))
        # Explicit layouts in and out: the updated state keeps its sharding step after step (and
        # donation can reuse the buffers); metrics (a dict) come back replicated.
        p_sh, o_sh, b_sh, r_sh = self.param_sharding, self.opt_sharding, self.batch_sharding, self.replicated
        # one jitted step per phase (distillation's blockwise phase has its own loss and mask)
        self._train = {phase: jax.jit(partial(self._train_impl, phase=phase),
                                      in_shardings=(p_sh, o_sh, r_sh, b_sh, b_sh, r_sh, self.t_sharding),
                                      out_shardings=(p_sh, o_sh, r_sh, r_sh),
                                      donate_argnums=(0, 1, 2) if donate else ()) for phase in PHASES}
        self._eval = jax.jit(self._eval_impl, in_shardings=(p_sh, b_sh, b_sh), out_shardings=r_sh)

    # -- pure functions ------------------------------------------------------------------
    def _loss(self, params, rest, x_BT, y_BT, deterministic: bool):
        # Fresh Variable objects at this trace level: dropout bumps its RNG counters in place.
        rest = jax.tree.map(lambda a: a, rest)
        model = nnx.merge(self.graphdef, params, rest)
        return model.loss(x_BT, y_BT, deterministic=deterministic)

    def _objective(self, params, rest, x_BT, y_BT, deterministic: bool, t_params, phase: str):
        """(the loss the step minimises, {metric: value}): the data's cross-entropy, or with a
        teacher the distillation phase's objective and its terms (train/distill.py)."""
        if self.distill is None:
            return self._loss(params, rest, x_BT, y_BT, deterministic), {}
        rest = jax.tree.map(lambda a: a, rest)
        student = nnx.merge(self.graphdef, params, rest)
        teacher = nnx.merge(self.t_graphdef, jax.lax.stop_gradient(t_params), self.t_rest)
        if phase == "blockwise":
            mse = blockwise_mse(student, attention_io(teacher, x_BT))
            return mse, {"distill_block_mse": mse}
        kl, ce = kd_terms(student.forward(x_BT, deterministic), teacher.forward(x_BT), y_BT, self.distill.temp)
        return self.distill.objective(kl, ce), {"distill_kl": kl, "distill_ce": ce}

    def _fault_record(self, count: int) -> dict[str, jax.Array]:
        rec = {"count": np.int32(count), "steps": np.zeros(FAULT_RING, np.int32),
               "kinds": np.zeros(FAULT_RING, np.int32)}
        return jax.device_put(rec, self.replicated)

    @staticmethod
    def _poison(step, steps: list[int]):
        """NaN at the listed (1-based) steps, else 1 (test-only, DBA_FAULT)."""
        hit = jnp.any(step + 1 == jnp.asarray(steps, jnp.int32))
        return jnp.where(hit, jnp.float32(jnp.nan), jnp.float32(1.0))

    def _train_impl(self, params, opt_state, faults, x_ABT, y_ABT, step, t_params, *, phase: str = "main"):
        self.trace_count += 1  # runs only while tracing
        n_micro = x_ABT.shape[0]
        base_key = jax.random.fold_in(jax.random.key(self.seed), step)
        grad_fn = jax.value_and_grad(self._objective, has_aux=True)

        def micro(i, x_BT, y_BT):
            rest = _reseed(self.rest, jax.random.fold_in(base_key, i)) if self.dropout else self.rest
            (loss_i, aux_i), g = grad_fn(params, rest, x_BT, y_BT, not self.dropout, t_params, phase)
            return loss_i, aux_i, g

        if n_micro == 1:
            loss, aux, grads = micro(0, x_ABT[0], y_ABT[0])
        else:
            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
            aux_shape = jax.eval_shape(lambda: micro(0, x_ABT[0], y_ABT[0])[1])
            aux0 = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), aux_shape)

            def body(carry, inp):
                g_acc, l_acc, a_acc = carry
                i, x_BT, y_BT = inp
                loss_i, aux_i, g = micro(i, x_BT, y_BT)
                g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
                a_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), a_acc, aux_i)
                return (g_acc, l_acc + loss_i, a_acc), None

            (g_sum, l_sum, a_sum), _ = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32), aux0),
                                                    (jnp.arange(n_micro), x_ABT, y_ABT))
            grads = jax.tree.map(lambda g, p: (g / n_micro).astype(p.dtype), g_sum, params)
            loss = l_sum / n_micro
            aux = jax.tree.map(lambda a: a / n_micro, a_sum)
        if self._nan_loss_at:  # test-only (DBA_FAULT): the gradients stay finite
            loss = loss * self._poison(step, self._nan_loss_at)
        if self._nan_grad_at:  # test-only (DBA_FAULT): the loss stays finite
            bad = self._poison(step, self._nan_grad_at)
            grads = jax.tree.map(lambda g: g * bad.astype(g.dtype), grads)
        grad_norm = optax.global_norm(grads)
        group_norms = group_grad_norms(grads, self.decoupled)
        updates, new_opt_state = self.tx.update(grads, opt_state, params)
        if phase == "blockwise":  # only attention learns: no update (not even weight decay) elsewhere
            updates = jax.tree.map(lambda u, m: u * m.astype(u.dtype), updates, self.update_mask)
        new_params = optax.apply_updates(params, updates)
        # A non-finite step applies nothing: old parameters and optimizer state, selected on the
        # device (like optax.apply_if_finite, without changing the optimizer state's structure).
        loss_ok, grad_ok = jnp.isfinite(loss), jnp.isfinite(grad_norm)
        ok = loss_ok & grad_ok
        keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
        params = jax.tree.map(keep, new_params, params)
        opt_state = jax.tree.map(keep, new_opt_state, opt_state)
        kind = (jnp.where(loss_ok, 0, NONFINITE_LOSS) + jnp.where(grad_ok, 0, NONFINITE_GRAD)).astype(jnp.int32)
        slot = faults["count"] % FAULT_RING
        faults = {"count": faults["count"] + jnp.where(ok, 0, 1).astype(jnp.int32),
                  "steps": jnp.where(ok, faults["steps"], faults["steps"].at[slot].set(step + 1)),
                  "kinds": jnp.where(ok, faults["kinds"], faults["kinds"].at[slot].set(kind))}
        hp = _find_hparams(opt_state)
        lr = jnp.asarray(hp["learning_rate"], jnp.float32) if hp and "learning_rate" in hp else jnp.float32(0)
        return params, opt_state, faults, {"loss": loss, "grad_norm": grad_norm, "lr": lr,
                                           "nonfinite_count": faults["count"], **group_norms, **aux}

    def _eval_impl(self, params, x_NBT, y_NBT):
        self.eval_trace_count += 1

        def body(total, xy):
            return total + self._loss(params, self.rest, xy[0], xy[1], True), None

        total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (x_NBT, y_NBT))
        return total / x_NBT.shape[0]

    # -- host API ------------------------------------------------------------------------
    def local_rows(self, global_batch: int) -> slice:
        """Rows of a global (A, B, T) batch that this process feeds (all of them on one host)."""
        return sharding.local_rows(self.batch_sharding, global_batch)

    def put_batch(self, local_ABT: np.ndarray) -> jax.Array:
        """This process's rows (`local_rows`) of a batch -> the global array, split over the mesh."""
        return jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(local_ABT))

    def phase_at(self, step: int) -> str:
        """The step's phase: distillation's blockwise phase for its first steps, else main."""
        return "blockwise" if self.distill is not None and step < int(self.distill.blockwise) else "main"

    def compile_for(self, x_ABT, y_ABT=None, phase: str = "main") -> float:
        """Ahead-of-time compile the train step for this batch shape (a global (A, B, T) shape,
        or arrays / int32 jax.ShapeDtypeStructs of it) and phase; returns seconds (0 if cached).
        Raises a UserError (exit 1) when the compiled step cannot fit in device memory."""
        if isinstance(x_ABT, tuple):
            x_ABT = jax.ShapeDtypeStruct(tuple(int(n) for n in x_ABT), jnp.int32)
        y_ABT = x_ABT if y_ABT is None else y_ABT
        key = tuple(x_ABT.shape)
        if (key, phase) in self._compiled:
            return 0.0
        sharding.check_batch(sharding.mesh_shape(self.mesh), int(x_ABT.shape[1]), "the batch size")
        t0 = time.perf_counter()
        compiled = self._train[phase].lower(self.params, self.opt_state, self.faults, x_ABT, y_ABT,
                                            np.int32(0), self.t_params).compile()
        dt = time.perf_counter() - t0
        self.compile_s += dt
        self._check_memory(compiled, key)
        self._compiled[(key, phase)] = compiled
        return dt

    def _check_memory(self, compiled: Any, key: tuple) -> None:
        """Refuse a step whose compiled per-device estimate exceeds the device's memory (CPU
        devices of one process share the host's memory, so there the estimate counts once per
        local device of the mesh)."""
        need = compiled_memory_bytes(compiled)
        if need is None:
            return
        self.memory_bytes[key] = need
        local = [d for d in self.mesh.devices.flat if d.process_index == jax.process_index()]
        device = local[0] if local else jax.local_devices()[0]
        limit = device_memory_limit(device)
        self.memory_limit = limit
        if limit is None:
            return
        shared = device.platform == "cpu" and len(local) > 1
        total = need * len(local) if shared else need
        if total > limit:
            a, b, t = key
            where = (f"x {len(local)} CPU devices = ~{human_bytes(total, 'iec')}, but the host has {human_bytes(limit, 'iec')}"
                     if shared else f"but the {device.platform} device has {human_bytes(limit, 'iec')}")
            raise UserError(
                f"the train step for batch {b} x seq {t} x accum {a} needs ~{human_bytes(need, 'iec')} per device "
                f"(compiled estimate) {where}; reduce --batch-size (and raise --grad-accum to keep the "
                f"global batch), the sequence length or the model, or try --grad-checkpoint or --mesh fsdp=N", 1)

    def compiled(self, x_ABT, y_ABT, phase: str = "main") -> Any:
        """The compiled train step for this batch shape and phase (compiled now if it was not
        yet), for `memory_analysis()`, `cost_analysis()` and its HLO text."""
        self.compile_for(x_ABT, y_ABT, phase)
        return self._compiled[(tuple(x_ABT.shape), phase)]

    def train_step(self, x_ABT, y_ABT, step: int) -> dict[str, jax.Array]:
        """One optimizer step (async: nothing is fetched from the device)."""
        fn = self.compiled(x_ABT, y_ABT, self.phase_at(step))
        self.params, self.opt_state, self.faults, metrics = fn(self.params, self.opt_state, self.faults,
                                                               x_ABT, y_ABT, np.int32(step), self.t_params)
        return metrics

    def set_nonfinite_count(self, count: int) -> None:
        """Start the non-finite step count at `count` (a resumed run continues its count)."""
        self.faults = self._fault_record(int(count))

    def nonfinite_record(self) -> tuple[int, list[tuple[int, int]]]:
        """(count, [(step, kind), ...] of the last min(count, FAULT_RING) non-finite steps, oldest
        first). Fetches a few bytes from the device: call it where the loop syncs anyway."""
        f = jax.device_get(self.faults)
        count = int(f["count"])
        out = []
        for i in range(max(0, count - FAULT_RING), count):
            out.append((int(f["steps"][i % FAULT_RING]), int(f["kinds"][i % FAULT_RING])))
        return count, out

    def eval_loss(self, x_NBT, y_NBT) -> jax.Array:
        return self._eval(self.params, x_NBT, y_NBT)

    @staticmethod
    def fetch(values: Any) -> Any:
        """Device scalars (`train_step`'s dict, an `eval_loss`, or a tuple/list/dict of them) ->
        the same structure of Python floats and ints: the sync point (torch_train/step.py's
        TorchStepper has the same method)."""
        return jax.tree.map(lambda v: np.asarray(v).item(), jax.device_get(values))

    @property
    def compiles(self) -> int:
        return len(self._compiled)

    def canonical_state(self) -> dict[str, np.ndarray]:
        """The current weights under canonical (v29) names, numpy. A collective: in a multi-host
        run every process calls it (the shards other hosts hold are gathered)."""
        from jax_model.weights_io import canonical_state
        from train.distributed import host_params

        return canonical_state(nnx.merge(self.graphdef, host_params(self.params), self.rest))

    @staticmethod
    def device_memory() -> dict[str, Any] | None:
        """The first local device's allocator stats (bytes_in_use, peak_bytes_in_use, bytes_limit
        on GPU/TPU; cheap, no sync), or None (XLA:CPU reports none)."""
        try:
            stats = jax.local_devices()[0].memory_stats()
        except Exception:  # noqa: BLE001 (a platform without stats)
            return None
        return dict(stats) if stats else None

    def model(self) -> DBAModel:
        """A model holding the current parameters (a copy: later steps do not change it)."""
        params = jax.tree.map(lambda a: jnp.array(a, copy=True), self.params)
        return nnx.merge(self.graphdef, params, self.rest)

    def set_state(self, params: Any, opt_state: Any) -> None:
        # A no-op for state restored onto this mesh's shardings; moves anything else there.
        self.params = jax.device_put(params, self.param_sharding)
        self.opt_state = jax.device_put(opt_state, self.opt_sharding)
