"""The train and eval steps of `dba train --backend torch`: `TorchStepper`, the host API of
train/step.py's `Stepper` over a torch_ref `DBAModel`. Never imports JAX.

One optimizer step = A = grad_accum micro-batches (x, y int (A, B, T)), with the JAX step's
semantics exactly (parity_tests/test_torch_train_parity.py checks them against it):

- gradients: each micro-batch's mean cross-entropy is back-propagated on its own and the step's
  gradient is the mean of the A micro-batch gradients (summed in fp32, divided by A, as the JAX
  scan does); the step's loss is the mean of the A losses;
- `grad_norm` is the global L2 norm of that gradient before clipping, `grad_norm_<group>` the
  norms of train/grad_norms.py's groups (embed, attn, ffn; attn_sem / attn_geo when decoupled);
- the update: optax's global-norm clip (`torch_ref.optim.clip_by_global_norm`), then
  torch_ref/optim.py's AdamW / Lion (paper) / Lion (v29), which do the JAX chain's arithmetic in
  its order, with v29's decoupled weight decay where `dba.optimizers.decays` says so, at the
  learning rate `LRSchedule.at(count)` (dba/optimizers.py, the formula the optax chain evaluates)
  where `count` is the number of updates applied so far, computed on the device in fp32;
- a step whose loss or gradient norm is not finite applies nothing: parameters, moments and the
  update count (hence the schedule) keep their values, selected on the device with torch.where,
  and the step is recorded in a device-side ring like the JAX `Stepper.faults` (`FAULT_RING`
  latest (step, kind)). `DBA_FAULT` nan_loss_at / nan_grad_at poison a step's loss / gradients
  (train/faults.py).

Nothing in `train_step` reads a value back to the host (no `.item()`, no data-dependent Python
branch), so CUDA and MPS run the steps asynchronously; `fetch` is the sync point.

The optimizer's arithmetic runs in fp32 (lower-precision parameters are read up, updated and
stored back; moments are kept in the parameter dtype, as optax keeps them). Mixed precision (`amp=True`) runs the forward under `torch.autocast` in bf16 or
fp16; the logits and the loss stay fp32 (torch_ref's `unembed` returns fp32 logits). fp16 uses a
dynamic loss scale (2^16 at the start, halved on an overflowing step, doubled after 2000 good
steps, all on the device; `loss_scaling=False` turns it off, as the JAX step has none): an
overflow step is skipped like a non-finite one but is not recorded as one while the scale can
still go down. `grad_checkpoint=True` recomputes each block in the backward pass
(torch.utils.checkpoint around the blocks' training forward).

Dropout: before each micro-batch the torch generator is seeded from (seed, step, micro-batch)
(`torch.manual_seed`), so dropout masks depend on the step only and a resumed run draws the same
masks as an uninterrupted one (not the JAX masks: bit equality with JAX dropout is not a goal).

`compile=True` wraps the micro-batch loss in `torch.compile` (mode `compile_mode`; not on MPS). `compile_for` (and the
first step of a new batch shape) runs one forward + backward on zeros of that shape so the
compile happens there and is timed into `compile_s`; if compiling fails the stepper falls back to
eager mode and says why in `compile_note`. On CUDA the peak allocator memory of a shape's first
step is kept in `memory_bytes[shape]`, and running out of device memory is a one-line UserError.

Differences from the JAX `Stepper`'s attributes: `model` is the live torch module (the JAX
`model()` is a method returning a copy), `params` is that module too (what the loop hands to the
analysis pass), there is no `graphdef`/`rest`/`opt_state`/`set_state` (checkpoints go through
`state_dict`/`load_state_dict`, see torch_train/checkpoints.py), one process and one device.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch

from dba.errors import UserError
from dba.optimizers import decays
from dba.param_groups import group_names, param_groups
from dba.units import human_bytes
from torch_ref import optim as topt
from torch_ref.loss import cross_entropy
from torch_ref.model import DBAModel
from torch_ref.weights_io import canonical_state
from torch_train.distill import attention_io, blockwise_mse, blockwise_trainable, kd_terms
from train.config import OptimConfig, PrecisionConfig
from train.faults import FAULT_RING, NONFINITE_GRAD, NONFINITE_LOSS, fault_points

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
SCALE_INIT, SCALE_GROWTH_EVERY, SCALE_MAX = 2.0 ** 16, 2000, 2.0 ** 24


def make_optimizer(named: list[tuple[str, torch.nn.Parameter]], o: OptimConfig, lr) -> topt.Lion | topt.AdamW:
    """torch_ref's optimizer for the --optimizer group `o`: one parameter group that decays and
    one that does not (dba.optimizers.decays), at the learning rate `lr` (a device tensor the
    step sets from the schedule)."""
    wd = float(o.weight_decay)
    groups = [{"params": [p for n, p in named if decays(n, p.ndim, o.wd_exempt_1d) == d],
               "weight_decay": wd if d else 0.0} for d in (True, False)]
    return topt.make(o.name, [g for g in groups if g["params"]], lr=lr, betas=o.betas, eps=float(o.adam_eps))


def _dropout_seed(seed: int, step: int, micro: int) -> int:
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(step), int(micro), 0xD8A]).generate_state(1, np.uint64)[0]
               & 0x7FFF_FFFF_FFFF_FFFF)


def _checkpoint_blocks(model: DBAModel) -> None:
    """Activation checkpointing (--grad-checkpoint): each block's forward is recomputed in the
    backward pass instead of keeping its activations (torch.utils.checkpoint, non-reentrant, RNG
    state preserved so dropout masks repeat). Only the training forward (no cache, grad enabled,
    train mode) is wrapped; cached and no-grad calls run the block as it is."""
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        if getattr(block, "_dba_checkpointed", False):
            continue
        plain = block.forward

        def forward(x, positions, cache=None, *, _plain=plain, _block=block, **kw):
            if cache is None and _block.training and torch.is_grad_enabled():
                return checkpoint(_plain, x, positions, use_reentrant=False, **kw)
            return _plain(x, positions, cache, **kw)

        block.forward = forward
        block._dba_checkpointed = True


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


class TorchStepper:
    """Train/eval steps of a torch_ref `DBAModel` (already on its device, in the parameter dtype
    it trains in) with the --optimizer group `optim` and the --amp/--grad-checkpoint group
    `precision` (train/config.py), over a run of `total_steps`.

    `train_step(x_ABT, y_ABT, step)` returns 0-d device tensors {loss, grad_norm, lr,
    nonfinite_count, grad_norm_<group>...} without syncing; `fetch(metrics)` turns them into
    Python numbers; `eval_loss(X_NBT, Y_NBT)` is the mean loss over N batches (a 0-d tensor).
    `model` is the live module the steps update.
    """

    def __init__(self, model: DBAModel, optim: OptimConfig, precision: PrecisionConfig, *, total_steps: int,
                 seed: int = 0, device: str | torch.device | None = None, compile: bool = False,
                 compile_mode: str | None = None, loss_scaling: bool | None = None,
                 teacher: DBAModel | None = None, distill: Any = None):
        """`teacher` and `distill` (a DistillConfig): the frozen model the step distils from
        (torch_train/distill.py), on the student's device."""
        self.model = model
        self.cfg = model.cfg
        self.device = model.device  # concrete (cuda:0, not cuda)
        want = torch.device(device) if device is not None else self.device
        if want.type != self.device.type or want.index not in (None, self.device.index):
            raise ValueError(f"the model is on {self.device}, not on {want}: move it there first")
        self.optim, self.precision = optim, precision
        self.optimizer = optim.name
        self.schedule = optim.schedule(int(total_steps))  # checks the schedule against the run length
        self.lr = float(optim.lr)
        self.grad_clip = float(optim.grad_clip) if float(optim.grad_clip) > 0 else None
        self.seed = int(seed)
        self.dropout = self.cfg.dropout > 0
        self.decoupled = self.cfg.attn_mode == "decoupled"
        self.amp = bool(precision.amp)
        self.amp_dtype = AMP_DTYPES[precision.amp_dtype]

        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.param_names = [n for n, _ in named]
        self._params = [p for _, p in named]
        self._groups = {g: [i for i, n in enumerate(self.param_names) if g in param_groups(n.split("."), self.decoupled)]
                        for g in group_names(self.decoupled)}

        dev = self.device
        with torch.no_grad():
            self._count = torch.zeros((), dtype=torch.int32, device=dev)  # updates applied (optax's count)
            self._lr_used = self._lr_at(self._count)  # inject_hyperparams' learning_rate: schedule(0) at init
        self.opt = make_optimizer(named, optim, self._lr_used)
        self._scaled = (self.amp and self.amp_dtype == torch.float16) if loss_scaling is None else bool(loss_scaling)
        if self._scaled:
            self._scale = torch.full((), SCALE_INIT, dtype=torch.float32, device=dev)
            self._good = torch.zeros((), dtype=torch.int32, device=dev)
        self.set_nonfinite_count(0)
        # TEST-ONLY hooks (DBA_FAULT): steps (1-based) whose loss / gradients are made NaN.
        self._nan_loss_at = fault_points("nan_loss_at")
        self._nan_grad_at = fault_points("nan_grad_at")

        self.trace_count = 0  # new batch shapes seen (one compile each with compile=True)
        self.compile_s = 0.0
        self.compile_note: str | None = None
        self._shapes: set[tuple[int, ...]] = set()
        self._ran: set[tuple[int, ...]] = set()
        self.memory_bytes: dict[tuple, int] = {}
        self.memory_limit: int | None = (int(torch.cuda.get_device_properties(dev).total_memory)
                                         if dev.type == "cuda" else None)
        if precision.grad_checkpoint:
            _checkpoint_blocks(model)
        self.teacher, self.distill = (teacher, distill) if teacher is not None else (None, None)
        if teacher is not None:
            teacher.eval().requires_grad_(False)
            self._frozen_in_blockwise = [j for j, n in enumerate(self.param_names) if not blockwise_trainable(n)]
        self._loss_fn = self._micro_loss
        self._update_fns = self._eager_update_fns = (topt.global_norm, topt.clip_by_global_norm, self.opt.step)
        self.compiling = False
        if compile and teacher is not None:
            self.compile_note = "torch.compile is not used with distillation; training eagerly"
        elif compile:
            if dev.type == "mps":
                self.compile_note = "torch.compile is not used on mps; training eagerly"
            else:
                try:
                    mode = None if compile_mode in (None, "", "default") else compile_mode
                    self._loss_fn = torch.compile(self._micro_loss, mode=mode)
                    # the update too: eagerly, clip + Lion/AdamW are ~10 passes over every
                    # parameter-sized tensor (~25 ms of a 190 ms CPU step on config A); compiled,
                    # one fused pass per parameter
                    self._update_fns = (torch.compile(topt.global_norm), torch.compile(topt.clip_by_global_norm),
                                        torch.compile(self.opt.step))
                    self.compiling = True
                except Exception as e:
                    self.compile_note = f"torch.compile unavailable ({_first_line(e)}); training eagerly"

    # -- pieces ----------------------------------------------------------------------------
    def _autocast(self):
        if not self.amp:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _micro_loss(self, x_BT: torch.Tensor, y_BT: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of one micro-batch, fp32 (the model's logits are fp32)."""
        with self._autocast():
            logits = self.model(x_BT)
        return cross_entropy(logits, y_BT)

    def _objective(self, x_BT: torch.Tensor, y_BT: torch.Tensor, phase: str) -> tuple[torch.Tensor, dict]:
        """(the loss the step minimises, {metric: value}) of one micro-batch: the data's
        cross-entropy, or with a teacher the distillation phase's objective and its terms."""
        if self.teacher is None:
            return self._loss_fn(x_BT, y_BT), {}
        if phase == "blockwise":
            io = attention_io(self.teacher, x_BT)
            with self._autocast():
                mse = blockwise_mse(self.model, io)
            return mse, {"distill_block_mse": mse.detach()}
        with torch.no_grad():
            t_logits = self.teacher(x_BT)
        with self._autocast():
            s_logits = self.model(x_BT)
        kl, ce = kd_terms(s_logits, t_logits, y_BT, float(self.distill.temp))
        loss = self.distill.objective(kl, ce)
        return loss, {"distill_kl": kl.detach(), "distill_ce": ce.detach()}

    def phase_at(self, step: int) -> str:
        """The step's phase: distillation's blockwise phase for its first steps, else main."""
        return "blockwise" if self.distill is not None and step < int(self.distill.blockwise) else "main"

    def _lr_at(self, count: torch.Tensor) -> torch.Tensor:
        """lr = schedule(count) in fp32 on the device (dba.optimizers.LRSchedule, the formula the
        optax chain evaluates too)."""
        return self.schedule.at(count.to(torch.float32), torch).to(torch.float32)

    def _reset_grads(self) -> None:
        for p in self._params:
            p.grad = None

    def _shape_key(self, x_ABT) -> tuple[int, ...]:
        shape = tuple(int(s) for s in (x_ABT if isinstance(x_ABT, (tuple, list)) else x_ABT.shape))
        if len(shape) != 3:
            raise ValueError(f"train batches are (A, B, T), got shape {shape}")
        return shape

    def _oom(self, e: BaseException, key: tuple[int, ...]) -> UserError:
        a, b, t = key
        limit = "" if self.memory_limit is None else f" (the device has {human_bytes(self.memory_limit, 'iec')})"
        return UserError(
            f"the train step for batch {b} x seq {t} x accum {a} ran out of {self.device.type} memory{limit}: "
            f"{_first_line(e)}; reduce --batch-size (and raise --grad-accum to keep the global batch), the "
            f"sequence length or the model", 1)

    # -- host API ------------------------------------------------------------------------
    def local_rows(self, global_batch: int) -> slice:
        """Rows of a global (A, B, T) batch this process feeds: all of them (one process)."""
        return slice(0, int(global_batch))

    def put_batch(self, local_ABT) -> torch.Tensor:
        """A host batch (numpy ints) -> an int64 tensor on the device (copied from pinned memory
        without blocking on CUDA)."""
        if torch.is_tensor(local_ABT):
            return local_ABT.to(self.device, torch.long)
        t = torch.from_numpy(np.ascontiguousarray(np.asarray(local_ABT), dtype=np.int64))
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        if self.device.type == "cpu":
            return t
        return t.to(self.device, non_blocking=True)

    def compile_for(self, x_ABT, y_ABT=None, phase: str = "main") -> float:
        """Get the step ready for this batch shape (an (A, B, T) array, tensor, anything with a
        `.shape`, or the shape itself); returns the compile seconds (0.0 when already seen or not
        compiling). With torch.compile, one forward + backward on zeros of one micro-batch
        compiles the graphs here; a failure falls back to eager (`compile_note`)."""
        del y_ABT, phase  # one eager objective per phase: nothing to compile per phase
        key = self._shape_key(x_ABT)
        if key in self._shapes:
            return 0.0
        self._shapes.add(key)
        self.trace_count += 1
        if not self.compiling:
            return 0.0
        a, b, t = key
        # the micro-batches as the step takes them: views into one (A, B, T) tensor
        zeros = torch.zeros((min(a, 2), b, t), dtype=torch.long, device=self.device)
        was_training = self.model.training
        self.model.train()
        t0 = time.perf_counter()
        try:
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                for i in range(zeros.shape[0]):
                    self._loss_fn(zeros[i], zeros[i]).backward()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        except torch.cuda.OutOfMemoryError as e:
            self._reset_grads()
            raise self._oom(e, key) from None
        except Exception as e:
            self._loss_fn, self._update_fns, self.compiling = self._micro_loss, self._eager_update_fns, False
            self.compile_note = f"torch.compile failed for batch {b} x seq {t} ({_first_line(e)}); training eagerly"
            return 0.0
        finally:
            self._reset_grads()
            self.model.train(was_training)
        dt = time.perf_counter() - t0
        self.compile_s += dt
        return dt

    def train_step(self, x_ABT, y_ABT, step: int) -> dict[str, torch.Tensor]:
        """One optimizer step (async: nothing is read back from the device)."""
        x_ABT, y_ABT = self.put_batch(x_ABT), self.put_batch(y_ABT)
        key = self._shape_key(x_ABT)
        self.compile_for(x_ABT, y_ABT)
        first = key not in self._ran and self.device.type == "cuda"
        if first:
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            metrics = self._step(x_ABT, y_ABT, int(step))
        except torch.cuda.OutOfMemoryError as e:
            self._reset_grads()
            raise self._oom(e, key) from None
        if first:
            self.memory_bytes[key] = int(torch.cuda.max_memory_allocated(self.device))
        self._ran.add(key)
        return metrics

    def _step(self, x_ABT: torch.Tensor, y_ABT: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        model, params = self.model, self._params
        n_micro = int(x_ABT.shape[0])
        model.train()
        self._reset_grads()
        low = [p.dtype != torch.float32 for p in params]
        acc: list[torch.Tensor | None] | None = None  # fp32 sums for low-precision params (A > 1)
        loss_sum = None
        phase = self.phase_at(step)
        aux: dict[str, torch.Tensor] = {}
        for i in range(n_micro):
            if self.dropout:
                torch.manual_seed(_dropout_seed(self.seed, step, i))
            loss_i, aux_i = self._objective(x_ABT[i], y_ABT[i], phase)
            for k, v in aux_i.items():
                aux[k] = v / n_micro if k not in aux else aux[k] + v / n_micro
            (loss_i * self._scale if self._scaled else loss_i).backward()
            loss_i = loss_i.detach()
            loss_sum = loss_i if loss_sum is None else loss_sum + loss_i
            if n_micro > 1 and any(low):
                if acc is None:
                    acc = [None] * len(params)
                for j, p in enumerate(params):
                    if low[j] and p.grad is not None:
                        g = p.grad.float()
                        acc[j] = g if acc[j] is None else acc[j] + g
                        p.grad = None
        with torch.no_grad():
            grads = []
            for j, p in enumerate(params):
                g = acc[j] if acc is not None and low[j] else p.grad
                if g is None:
                    g = torch.zeros_like(p, dtype=torch.float32 if (n_micro > 1 and low[j]) else p.dtype)
                if self._scaled:
                    g = g.float() / self._scale
                if n_micro > 1:  # the mean of the micro-batch gradients (fp32 sum / A)
                    g = (g / n_micro).to(p.dtype)
                elif self._scaled:
                    g = g.to(p.dtype)
                grads.append(g)
            self._reset_grads()
            loss = loss_sum / n_micro if n_micro > 1 else loss_sum
            poison_grad = step + 1 in self._nan_grad_at
            if step + 1 in self._nan_loss_at:  # test-only (DBA_FAULT): the gradients stay finite
                loss = loss * float("nan")
            if poison_grad:  # test-only (DBA_FAULT): the loss stays finite
                grads = [g * float("nan") for g in grads]
            metrics = self._apply(grads, loss, step, poison_grad, phase)
            return {**metrics, **aux}

    def _update_call(self, i: int, *args, **kwargs):
        """Update function i (global norm, clip, optimizer step), compiled when the step is; a
        compile failure switches all three to eager (`compile_note`) and runs it eagerly (they
        fail while compiling, before writing anything)."""
        fn = self._update_fns[i]
        if fn is self._eager_update_fns[i]:
            return fn(*args, **kwargs)
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            self._update_fns = self._eager_update_fns
            self.compile_note = self.compile_note or f"torch.compile failed for the update ({_first_line(e)}); " \
                                                      "updating eagerly"
            return self._eager_update_fns[i](*args, **kwargs)

    def _apply(self, grads: list[torch.Tensor], loss: torch.Tensor, step: int,
               poisoned: bool, phase: str = "main") -> dict[str, torch.Tensor]:
        """Norms, clip, optimizer update and the non-finite selection, all on the device."""
        grad_norm, sq = self._update_call(0, grads)
        zero = torch.zeros((), dtype=torch.float32, device=self.device)
        group_norms = {f"grad_norm_{g}": (torch.stack([sq[i] for i in idx]).sum() if idx else zero).sqrt()
                       for g, idx in self._groups.items()}
        loss_ok, grad_ok = torch.isfinite(loss), torch.isfinite(grad_norm)
        ok = loss_ok & grad_ok
        record = ~ok
        if self._scaled:  # an fp16 overflow the scale can still back off from: skipped, not recorded
            overflow = loss_ok & ~grad_ok & (self._scale > 1.0)
            if poisoned:
                overflow = torch.zeros_like(overflow)
            record = record & ~overflow

        lr = self._lr_at(self._count)
        for group in self.opt.param_groups:
            group["lr"] = lr
        for p, g in zip(self._params, self._update_call(1, grads, self.grad_clip, grad_norm)):
            p.grad = g
        # blockwise distillation trains attention only: the rest keeps its values exactly (no
        # weight decay either), as the JAX step's masked update
        kept = [self._params[j].detach().clone() for j in self._frozen_in_blockwise] if phase == "blockwise" else []
        self._update_call(2, apply=ok)
        for j, old in zip(self._frozen_in_blockwise if kept else (), kept):
            self._params[j].copy_(old)
        self._reset_grads()
        self._count = torch.where(ok, self._count + 1, self._count)
        self._lr_used = torch.where(ok, lr, self._lr_used)
        if self._scaled:
            good = torch.where(ok, self._good + 1, torch.zeros_like(self._good))
            grow = good >= SCALE_GROWTH_EVERY
            scale = torch.where(grow, torch.clamp(self._scale * 2.0, max=SCALE_MAX), self._scale)
            self._scale = torch.where(loss_ok & ~grad_ok, torch.clamp(scale * 0.5, min=1.0), scale)
            self._good = torch.where(grow, torch.zeros_like(good), good)

        kind = (torch.where(loss_ok, 0, NONFINITE_LOSS) + torch.where(grad_ok, 0, NONFINITE_GRAD)).to(torch.int32)
        f = self.faults
        at = (self._ring == f["count"] % FAULT_RING) & record
        self.faults = {"count": f["count"] + record.to(torch.int32),
                       "steps": torch.where(at, torch.full_like(f["steps"], step + 1), f["steps"]),
                       "kinds": torch.where(at, kind, f["kinds"])}
        return {"loss": loss, "grad_norm": grad_norm, "lr": self._lr_used, "nonfinite_count": self.faults["count"],
                **group_norms}

    @staticmethod
    def fetch(values: Any) -> Any:
        """Device scalars (`train_step`'s dict, an `eval_loss`, or a tuple/list/dict of them) ->
        the same structure of Python floats and ints: the sync point."""
        if torch.is_tensor(values):
            return values.item()
        if isinstance(values, dict):
            tensors = [v for v in values.values() if torch.is_tensor(v) and v.numel() == 1]
            if len(tensors) == len(values) and tensors and len({t.device for t in tensors}) == 1:
                # one transfer for the whole dict; fp32 holds the int counts exactly (< 2^24)
                flat = torch.stack([t.reshape(()).to(torch.float32) for t in tensors]).tolist()
                return {k: (int(x) if not (t.dtype.is_floating_point or t.dtype.is_complex) else x)
                        for (k, t), x in zip(values.items(), flat)}
            return {k: TorchStepper.fetch(v) for k, v in values.items()}
        if isinstance(values, (tuple, list)):
            return type(values)(TorchStepper.fetch(v) for v in values)
        return values

    def eval_loss(self, x_NBT, y_NBT) -> torch.Tensor:
        """Mean loss over N batches (eval mode, no dropout, autocast as in training): 0-d fp32."""
        x_NBT, y_NBT = self.put_batch(x_NBT), self.put_batch(y_NBT)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                total = torch.zeros((), dtype=torch.float32, device=self.device)
                for i in range(int(x_NBT.shape[0])):
                    total = total + self._micro_loss(x_NBT[i], y_NBT[i])
        finally:
            self.model.train(was_training)
        return total / int(x_NBT.shape[0])

    # -- non-finite record ----------------------------------------------------------------
    def set_nonfinite_count(self, count: int) -> None:
        """Start the non-finite step count at `count` (a resumed run continues its count)."""
        dev = self.device
        self._ring = torch.arange(FAULT_RING, dtype=torch.int32, device=dev)
        self.faults = {"count": torch.full((), int(count), dtype=torch.int32, device=dev),
                       "steps": torch.zeros(FAULT_RING, dtype=torch.int32, device=dev),
                       "kinds": torch.zeros(FAULT_RING, dtype=torch.int32, device=dev)}

    def nonfinite_record(self) -> tuple[int, list[tuple[int, int]]]:
        """(count, [(step, kind), ...] of the last min(count, FAULT_RING) non-finite steps, oldest
        first). Reads a few bytes from the device: call it where the loop syncs anyway."""
        f = {k: v.cpu().tolist() for k, v in self.faults.items()}
        count = int(f["count"])
        return count, [(int(f["steps"][i % FAULT_RING]), int(f["kinds"][i % FAULT_RING]))
                       for i in range(max(0, count - FAULT_RING), count)]

    @property
    def params(self) -> DBAModel:
        """The trained state, for what the JAX loop passes `Stepper.params` to (the analysis
        pass): here the live model itself."""
        return self.model

    def device_memory(self) -> dict[str, Any] | None:
        """Allocator readings of the device, JAX's `memory_stats()` names (cheap, no sync):
        bytes_in_use, peak_bytes_in_use, bytes_reserved, bytes_limit on CUDA; bytes_in_use and
        bytes_reserved on MPS; None on the CPU."""
        dev = self.device
        try:
            if dev.type == "cuda":
                return {"bytes_in_use": int(torch.cuda.memory_allocated(dev)),
                        "peak_bytes_in_use": int(torch.cuda.max_memory_allocated(dev)),
                        "bytes_reserved": int(torch.cuda.memory_reserved(dev)), "bytes_limit": self.memory_limit}
            if dev.type == "mps":
                return {"bytes_in_use": int(torch.mps.current_allocated_memory()),
                        "bytes_reserved": int(torch.mps.driver_allocated_memory())}
        except Exception:
            return None
        return None

    @property
    def compiles(self) -> int:
        """Distinct batch shapes prepared so far (compiled ones with torch.compile)."""
        return len(self._shapes)

    @property
    def update_count(self) -> torch.Tensor:
        """Updates applied so far (skipped non-finite steps excluded): the schedule's step."""
        return self._count

    # -- state ----------------------------------------------------------------------------
    def canonical_state(self) -> dict[str, np.ndarray]:
        """The current weights under canonical (v29) names, numpy (torch_ref.canonical_state)."""
        return canonical_state(self.model)

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue exactly: model, optimizer (moments, update
        count = the schedule's position, the last lr), non-finite record, loss scale, RNG states."""
        opt: dict[str, Any] = {"name": self.optimizer, "count": self._count, "lr": self._lr_used,
                               "mu": {n: self.opt.moments(p)["exp_avg"] for n, p in zip(self.param_names, self._params)}}
        if self.optimizer == "adamw":
            opt["nu"] = {n: self.opt.moments(p)["exp_avg_sq"] for n, p in zip(self.param_names, self._params)}
        rng: dict[str, Any] = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        out = {"model": self.model.state_dict(), "optimizer": opt, "nonfinite": dict(self.faults), "rng": rng}
        if self._scaled:
            out["loss_scale"] = {"scale": self._scale, "good_steps": self._good}
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`'s output into this stepper (tensors copied onto its device).
        A one-line UserError when it does not fit (another model or optimizer)."""
        opt = state.get("optimizer", {})
        if opt.get("name") != self.optimizer:
            raise UserError(f"the checkpoint's optimizer is {opt.get('name')!r}, this run's is {self.optimizer!r}", 1)
        try:
            self.model.load_state_dict(state["model"], strict=True)
        except RuntimeError as e:
            raise UserError(f"the checkpoint does not fit this model (did the model change?): {_first_line(e)}",
                            1) from None
        with torch.no_grad():
            names = (("mu", "exp_avg"), ("nu", "exp_avg_sq")) if self.optimizer == "adamw" else (("mu", "exp_avg"),)
            for key, buffer in names:
                mine = [self.opt.moments(p)[buffer] for p in self._params]
                if key not in opt:
                    raise UserError(f"the checkpoint's {self.optimizer} state has no {key!r} moments", 1)
                saved = opt[key]
                if sorted(saved) != sorted(self.param_names):
                    raise UserError("the checkpoint's optimizer state has other parameters than this model", 1)
                for name, t in zip(self.param_names, mine):
                    if tuple(saved[name].shape) != tuple(t.shape):
                        raise UserError(f"the checkpoint's optimizer state for {name} has shape "
                                        f"{tuple(saved[name].shape)}, this model's {tuple(t.shape)}", 1)
                    t.copy_(saved[name])
            dev = self.device
            self._count = torch.as_tensor(opt["count"]).to(dev, torch.int32).reshape(())
            for p in self._params:  # the optimizer's own update count (AdamW's bias corrections)
                self.opt.state[p]["step"] = self._count.clone()
            self._lr_used = torch.as_tensor(opt["lr"]).to(dev, torch.float32).reshape(())
            self.faults = {k: torch.as_tensor(v).to(dev, torch.int32) for k, v in state["nonfinite"].items()}
            if self._scaled and "loss_scale" in state:
                self._scale = torch.as_tensor(state["loss_scale"]["scale"]).to(dev, torch.float32).reshape(())
                self._good = torch.as_tensor(state["loss_scale"]["good_steps"]).to(dev, torch.int32).reshape(())
        rng = state.get("rng") or {}
        if "cpu" in rng:
            torch.set_rng_state(torch.as_tensor(rng["cpu"]).cpu())
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(torch.as_tensor(rng["cuda"]).cpu(), self.device)
