"""A `dba train` run: one framework-free loop composed with a small backend per framework.

`RunPlan(config)` works out what the run trains (data, model config, initial weights, analysis)
without touching a device or the run directory. `Run(plan, backend, out_dir=...)` is the loop:
`start()` asks the backend for the step and the checkpoints and sets up the display, analysis and
hooks; `fit()` trains, with the periodic work (train log, analysis, evaluation, checkpoints,
display) registered as hooks with an interval (train/hooks.py). `train()` does the last two.

The backend (train/jax_backend.py `JaxBackend`, torch_train/backend.py `TorchBackend`) is what
differs between the frameworks, and nothing else:
    name, main, process_count, notes       who writes the run directory; lines for the header
    environment(), device_text(env)        the software/device record (meta, summary.md)
    checkpoints(out)                       resumable state: save(kind, step, stepper, seed, meta),
                                           restore(kind, stepper) -> (step, meta), latest_step,
                                           read_meta, unreadable(kind), close
    build(plan)                            the stepper: model (initial weights), optimizer, step
    restored(meta)                         after a resume (e.g. a checkpoint from another mesh)
    analysis(spec, stepper, tokens)        () -> (metrics, arrays) of the attention analysis pass
The steppers (train/step.py `Stepper`, torch_train/step.py `TorchStepper`) share one host API:
train_step, eval_loss, fetch, compile_for(shape), put_batch, local_rows, nonfinite_record,
set_nonfinite_count, canonical_state, device_memory and their compile/memory counters.

The device only syncs at log, eval and save steps; the next batch is sampled on the host while the
device runs the current step (JAX dispatch and CUDA are asynchronous).

Faults: a step with a non-finite loss or gradient norm applies no update (inside the step) and is
counted on the device; at the next point where the loop syncs anyway the count is read
(`check_nonfinite`): each such step gets a `nonfinite` event, and once more than
`--skip-nonfinite` of them have happened the run stops before it evaluates or saves anything
(the last good checkpoint stays the latest), records `done` with reason `nonfinite` and fails
with a one-line error (exit 1). A checkpoint that cannot be written (disk full) or a train step
that cannot fit in device memory (checked when it compiles; the longest sequence length of the
run is compiled first, before the first step) is a one-line error too, after a `done` event
with reason `error`. SIGINT/SIGTERM save the last checkpoint and stop (exit 130/143). A resumed
run needs only the `last` checkpoint: an unreadable `best` is a one-line warning, and the next
evaluation writes a new one.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dba.errors import UserError
from dba.units import human_bytes
from train.batches import (
    EVAL_TRAIN_STREAM,
    EVAL_VAL_STREAM,
    RunData,
    eval_batches,
    train_batch,
)
from train.config import RunConfig
from train.distributed import Silent
from train.hooks import Hook, Hooks
from train.signals import EXIT_CODES, StopSignal

_NUMPY_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass
class Progress:
    """Where the run is: the step, the best evaluation, the non-finite steps seen, the last save."""

    step: int = 0
    best_val: float | None = None
    best_step: int | None = None
    nonfinite_seen: int = 0
    saved_last_at: int | None = None
    lengths: set[int] = field(default_factory=set)  # sequence lengths trained at by this invocation


@dataclass
class Throughput:
    """Tokens and time since the last log (compiles excluded), for tokens/s and ms/step."""

    t_mark: float = field(default_factory=time.perf_counter)
    steps: int = 0
    tokens: int = 0
    excluded_s: float = 0.0
    data_s: float = 0.0

    def reset(self) -> None:
        self.t_mark, self.steps, self.tokens, self.excluded_s, self.data_s = time.perf_counter(), 0, 0, 0.0, 0.0

    def elapsed(self) -> float:
        return max(time.perf_counter() - self.t_mark - self.excluded_s, 1e-9)


def train(plan: "RunPlan", backend: Any, *, out_dir: str | Path, name: str, argv: list[str]) -> int:
    """Build and train a planned run in `out_dir` with `backend` (see the module docstring); the
    exit status (0 done, 130/143 interrupted)."""
    run = Run(plan, backend, out_dir=out_dir, name=name, argv=argv)
    run.start()
    return run.fit()


class RunPlan:
    """What a run will train, worked out without touching a device or the run directory: the data,
    the initial weights (--ckpt) or the resumed run's config, the ModelConfig (its context grown to
    the longest trained length) and the analysis to run. Every mistake found here is a one-line
    UserError before anything is written."""

    def __init__(self, config: RunConfig, resume_meta: dict[str, Any] | None = None, framework: str = "jax",
                 framework_note: str | None = None, device: str | None = None):
        self.config, self.resume_meta = config, resume_meta
        # the framework that trains ("jax" | "torch"), why when the flags did not say, and the
        # torch device ("cpu", "cuda:0", "mps"; None for JAX, whose platform is set process-wide)
        self.framework, self.framework_note, self.device = framework, framework_note, device
        self.data = RunData.load(config.data)
        ckpt_cfg, self.init_state, self.init_info = self._initial_weights()
        self.cfg, self.context = config.resolve_model(self.data.vocab_size, ckpt_cfg, check_clash=resume_meta is None)
        longest_train = config.steps.schedule.max_length(config.steps.steps)
        self.data.check_lengths(longest_train, int(config.eval.seq_len) or longest_train)
        from dba.analysis_spec import spec_for

        self.analysis_spec = spec_for(config.analysis, config.eval.every, self.cfg)
        self.teacher = self._teacher()
        if config.analysis.tb:
            try:
                import tensorboardX  # noqa: F401
            except ImportError:
                raise UserError("--tb needs tensorboardX, which is not installed: pip install 'dba[tb]' "
                                "(or pip install tensorboardX)", 2) from None

    def _initial_weights(self):
        """(config, state, info) of --ckpt for a new run; the saved config on --resume."""
        from dba.config import ModelConfig

        if self.resume_meta is not None:
            return ModelConfig.from_dict(self.resume_meta["config"]), None, None
        if self.config.ckpt.ckpt:
            from dba.weight_files import read_weights

            return read_weights(self.config.ckpt.ckpt)
        return None, None, None

    def _teacher(self):
        """(config, state, info) of --distill-from, checked against the student and the data; None
        without distillation. Distillation flags without a teacher are a mistake."""
        d = self.config.distill
        if not d.on:
            given = sorted(f for f in self.config.explicit if f.startswith("distill_"))
            if given:
                raise UserError(f"--{given[0].replace('_', '-')} needs --distill-from TEACHER", 2)
            return None
        from dba.weight_files import read_weights
        from train.distill import check_teacher

        t_cfg, t_state, t_info = read_weights(d.distill_from)
        check_teacher(self.cfg, t_cfg, int(d.blockwise), d.distill_from)
        if self.data.vocab_size > t_cfg.vocab_size:
            raise UserError(f"--distill-from {d.distill_from!r}: the data has ids up to {self.data.vocab_size - 1}, "
                            f"outside the teacher's vocabulary of {t_cfg.vocab_size} ids", 2)
        if t_cfg.block_size < self.cfg.block_size:
            t_cfg = t_cfg.replace(block_size=self.cfg.block_size)  # RoPE extends; the run's length rules
        return t_cfg, t_state, t_info

    def print_config(self, out_dir: str | Path) -> None:
        """--print-config: the resolved model and flags as JSON."""
        print(json.dumps({"model": self.cfg.to_dict(), "args": self.config.to_flags(), "context": self.context,
                          "run_dir": str(out_dir), "backend": self.framework, "device": self.device},
                         indent=2, sort_keys=True, default=str))


class Run:
    """The loop of one planned run (`plan`) with one backend; see the module docstring."""

    def __init__(self, plan: RunPlan, backend: Any, *, out_dir: str | Path, name: str, argv: list[str]):
        self.plan, self.backend, self.out, self.name, self.argv = plan, backend, Path(out_dir), name, list(argv)
        self.t_start = time.time()
        self.created = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        self.command = "dba train" + ("" if not self.argv else " " + shlex.join(self.argv))

    @property
    def main(self) -> bool:
        """This process writes the run directory's files (every process computes)."""
        return self.backend.main

    def start(self) -> None:
        """Build the step (optimizer state restored on --resume), checkpoints, display, analysis
        and hooks. Writes nothing but an empty checkpoints directory."""
        c, b = self.plan.config, self.backend
        self.env = b.environment()
        self.out.mkdir(parents=True, exist_ok=True)
        self.ckpts = b.checkpoints(self.out)
        self.stepper = b.build(self.plan)
        self._compiled_phases: set[tuple[int, str]] = set()  # (sequence length, phase) compiled so far
        self.rows = self.stepper.local_rows(int(c.steps.batch_size))  # this host's share of every batch
        self.progress = Progress()
        self.notes = list(b.notes)  # said under the run's header (`_announce`)
        if self.plan.teacher is not None:
            d, (t_cfg, _, t_info) = c.distill, self.plan.teacher
            terms = {"kl": f"KL at temperature {d.temp:g}", "ce": "the data's cross-entropy (the teacher measured)",
                     "kl+ce": f"{d.alpha:g} KL (temperature {d.temp:g}) + {1 - d.alpha:g} CE"}[d.loss]
            block = f"; the first {d.blockwise} steps blockwise (attention outputs)" if d.blockwise else ""
            self.notes.append(f"distilling from {t_info['source']} ({t_cfg.attn_mode}, {t_cfg.num_params():,} params, "
                              f"{d.teacher_dtype}): {terms}{block}")
        if self.plan.resume_meta is not None:
            self._restore()
        # train.jsonl is opened once the train step has compiled (`fit`): a step too large for the
        # device fails before the run directory holds a run, so the corrected command runs as is.
        self.log: Any = Silent()
        self._start_display_and_analysis()
        self.stop = StopSignal(shared=b.process_count > 1)
        self.hooks = self._default_hooks()
        self._eval_cache: dict[int, tuple] = {}
        self.window = Throughput()
        self.latest: tuple[Any, int] | None = None  # device metrics and length of the newest step

    def _restore(self) -> None:
        """--resume: the `last` checkpoint into the stepper; an unreadable `best` is a warning
        (its figures are forgotten, so the next evaluation writes a new best)."""
        step, meta = self.ckpts.restore("last", self.stepper)
        seen = int(meta.get("skipped_nonfinite") or 0)
        self.stepper.set_nonfinite_count(seen)
        self.progress = Progress(step=step, best_val=meta.get("best_val"), best_step=meta.get("best_step"),
                                 nonfinite_seen=seen, saved_last_at=step)
        self.notes += self.backend.restored(meta)
        why = self.ckpts.unreadable("best") if meta.get("best_step") is not None else None
        if why is not None:
            self.progress.best_val = self.progress.best_step = None
            self.notes.append(f"warning: the 'best' checkpoint cannot be read ({why}); resuming from 'last', "
                              f"the next evaluation writes a new 'best'")

    def _start_display_and_analysis(self) -> None:
        from train.dashboard import make_display

        c, main, spec = self.plan.config, self.main, self.plan.analysis_spec
        self.display = (make_display(c.display.live, c.steps.steps, self.progress.step,
                                     device_memory=self.stepper.device_memory) if main else Silent())
        self.tb = self.wandb = None  # the W&B run starts with train.jsonl (`open_log`)
        # the W&B run this run logs to: recorded in checkpoint meta, so --resume continues it
        self.wandb_id = (self.plan.resume_meta or {}).get("wandb_id")
        if c.analysis.tb and main:
            from train.tensorboard import TBWriter

            self.tb = TBWriter(self.out / "tb")
        self.analyzer = self.store = None
        self.plot_stale = False  # events the plot draws were logged since analysis.png was drawn
        if spec is None:
            return
        from dba.analysis_spec import analysis_tokens
        from train.analysis_store import AnalysisStore

        tokens = analysis_tokens(self.plan.data.val, spec, self.plan.cfg.block_size, c.run.seed)
        self.analysis_len = int(tokens.shape[1])
        self.analyzer = self.backend.analysis(spec, self.stepper, tokens)
        self.store = AnalysisStore(self.out / "analysis.h5", save_matrices=spec.save_matrices,
                                   save_svals=spec.save_svals) if main else Silent()

    # ---- hooks --------------------------------------------------------------------------
    def add_hook(self, name: str, every: int, fn, **kw) -> Hook:
        """Run `fn(step)` after every `every`-th step (see train/hooks.py for at_end, on_stop,
        reads_state, syncs)."""
        return self.hooks.add(Hook(name, int(every), fn, **kw))

    def _default_hooks(self) -> Hooks:
        c = self.plan.config
        self.hooks = Hooks()
        self.add_hook("log", c.display.log_every, self.log_train, on_stop=True, reads_state=False)
        self.add_hook("display", c.display.update_every, self.display.advance, at_end=False, reads_state=False,
                      syncs=False)
        if self.analyzer is not None:
            self.add_hook("analysis", self.plan.analysis_spec.every, self.analyse)
        self.add_hook("eval", c.eval.every, self.evaluate)
        self.add_hook("save", c.ckpt.save_every, self.save_last, at_end=False)  # the final save is `fit`'s
        return self.hooks

    # ---- the pieces -----------------------------------------------------------------------
    def record(self, event: str, **fields) -> dict[str, Any] | None:
        """One event in train.jsonl (and TensorBoard, W&B)."""
        if event in ("train", "eval", "analysis"):
            self.plot_stale = True
        rec = self.log.write(event, **fields)
        if self.tb is not None and rec is not None:
            self.tb.event(rec)
        if self.wandb is not None and rec is not None:
            self.wandb.event(rec)
        return rec

    def device_memory(self) -> dict[str, Any] | None:
        """The device allocator's stats (`bytes_in_use`, ...), or None where there are none."""
        return self.stepper.device_memory()

    def log_train(self, step: int) -> dict[str, Any] | None:
        """The `train` event of the newest step: loss, lr, throughput, gradient norms, memory."""
        from dba.resources import host_rss_bytes

        metrics, length = self.latest
        m, w = self.stepper.fetch(metrics), self.window
        elapsed, loss = w.elapsed(), float(m["loss"])
        rss, rss_peak = host_rss_bytes()
        dev_mem = self.device_memory()
        s = self.plan.config.steps
        # distilling, the loss is the distillation objective: ppl is the data's (main phase) or none
        data_loss = float(m["distill_ce"]) if "distill_ce" in m else (None if "distill_block_mse" in m else loss)
        fields = dict(step=step, loss=loss, ppl=None if data_loss is None else math.exp(min(data_loss, 700.0)),
                      lr=float(m["lr"]),
                      tok_s=w.tokens / elapsed, seq_len=int(length), grad_accum=int(s.grad_accum),
                      global_batch=int(s.batch_size) * int(s.grad_accum), step_ms=1000.0 * elapsed / w.steps,
                      data_ms=1000.0 * w.data_s / w.steps, grad_norm_total=float(m["grad_norm"]),
                      **{k: float(v) for k, v in m.items() if k.startswith(("grad_norm_", "distill_"))},
                      skipped_nonfinite=int(m["nonfinite_count"]), compiles=self.stepper.compiles,
                      host_rss_mb=None if rss is None else rss / 2**20,
                      host_peak_mb=None if rss_peak is None else rss_peak / 2**20,
                      device_mem_mb=None if dev_mem is None else dev_mem.get("bytes_in_use", 0) / 2**20)
        rec = self.record("train", **fields)
        self.display.set_timing(compile_s=self.stepper.compile_s)
        # the log writes NaN as null; the display shows it as nan
        self.display.train({**(rec or {}), **{k: v for k, v in fields.items() if isinstance(v, float)}})
        if self.plan.config.analysis.live_plot:
            self.redraw_plot(upload=False)  # W&B gets the plots of evaluations and the end
        w.reset()
        return rec

    def evaluate(self, step: int) -> dict[str, Any] | None:
        """Validation and train loss on the fixed eval batches at the current training length
        (or --eval-seq-len); a new best saves the `best` checkpoint."""
        c, p = self.plan.config, self.progress
        length = int(c.eval.seq_len) or c.steps.schedule.length_at(max(step - 1, 0))
        xv, yv, xt, yt = self._eval_batches(length)
        t0 = time.perf_counter()
        val_loss, train_loss = (float(v) for v in self.stepper.fetch((self.stepper.eval_loss(xv, yv),
                                                                      self.stepper.eval_loss(xt, yt))))
        new_best = step > 0 and math.isfinite(val_loss) and (p.best_val is None or val_loss < p.best_val)
        if new_best:
            p.best_val, p.best_step = val_loss, step
        eval_s = time.perf_counter() - t0
        rec = self.record("eval", step=step, train_loss=train_loss, val_loss=val_loss,
                          val_ppl=math.exp(min(val_loss, 700.0)), best_val=p.best_val, seq_len=length, eval_s=eval_s)
        self.display.set_timing(eval_s=eval_s)
        self.display.eval(rec)
        if new_best:
            self.save("best", step, val_loss)
        self.redraw_plot()
        return rec

    def _eval_batches(self, length: int) -> tuple:
        if length not in self._eval_cache:
            c = self.plan.config
            kw = dict(batch_size=int(c.steps.batch_size), iters=int(c.eval.iters), seed=c.run.seed, seq_len=length,
                      rows=self.rows)
            xv, yv = eval_batches(self.plan.data.val, stream=EVAL_VAL_STREAM, **kw)
            xt, yt = eval_batches(self.plan.data.train, stream=EVAL_TRAIN_STREAM, **kw)
            self._eval_cache[length] = tuple(self.stepper.put_batch(a) for a in (xv, yv, xt, yt))
        return self._eval_cache[length]

    def analyse(self, step: int) -> dict[str, Any] | None:
        """The attention analysis pass: analysis.h5 first, so every logged analysis has its group."""
        t0 = time.perf_counter()
        spec = self.plan.analysis_spec
        metrics, arrays = self.analyzer()
        self.store.append(step, metrics, arrays, spec.layers, spec.heads)
        took = time.perf_counter() - t0
        rec = self.record("analysis", step=step, seq_len=self.analysis_len, level=spec.level,
                          layers=list(spec.layers), heads=list(spec.heads), **metrics, analysis_s=took)
        self.display.set_timing(analysis_s=took)
        self.display.analysis(rec)
        return rec

    def save(self, kind: str, step: int, val: float | None = None) -> None:
        """The resumable checkpoint `kind` ('last' / 'best') and its safetensors export."""
        self.ckpts.save(kind, step, self.stepper, self.plan.config.run.seed, self.checkpoint_meta(step))
        self.export(kind, step, val)

    def save_last(self, step: int) -> None:
        self.save("last", step)
        self.progress.saved_last_at = step

    def checkpoint_meta(self, step: int) -> dict[str, Any]:
        p = self.progress
        c = self.plan.config
        return {"config": self.plan.cfg.to_dict(), "flags": c.to_flags(), "step": step, "seed": c.run.seed,
                "best_val": p.best_val, "best_step": p.best_step, "tokenizer": self._tokenizer_dict(),
                "context": self.plan.context, "run_name": self.name, "skipped_nonfinite": p.nonfinite_seen,
                "wandb_id": self.wandb_id}

    def _tokenizer_dict(self) -> dict[str, Any] | None:
        return self.plan.data.tokenizer.to_dict() if self.plan.data.tokenizer is not None else None

    def export(self, kind: str, step: int, val: float | None) -> None:
        """`<kind>.safetensors`: the weights with the config (and tokenizer) in the metadata,
        written to a temporary name and renamed (dba.weights.save_safetensors)."""
        from dba.weights import save_safetensors

        extra = {"step": str(step), "kind": kind, "run_dir": str(self.out), "trained_with": self.backend.name}
        if val is not None:
            extra["val_loss"] = repr(float(val))
        if self.plan.data.tokenizer is not None:
            extra["tokenizer"] = json.dumps(self._tokenizer_dict())
        state = self.stepper.canonical_state()  # every process: gathers shards held by other hosts
        if not self.main:
            return
        path = self.out / f"{kind}.safetensors"
        try:
            save_safetensors(path, self.plan.cfg, state, extra)
        except OSError as e:
            path.with_name(path.name + ".tmp").unlink(missing_ok=True)
            why = os.strerror(e.errno) if e.errno else str(e)
            raise UserError(f"cannot write {path} (step {step}): {why}; the checkpoint of step {step} "
                            f"under {self.ckpts.root / kind} was written", 1) from None

    def redraw_plot(self, upload: bool = True) -> None:
        if not self.main:
            return
        from dba.plots import plot_run
        from dba.runlog import read_events

        self.plot_stale = False
        try:
            plot_run(read_events(self.out / "train.jsonl"), self.out / "analysis.png",
                     title=f"{self.name}: {self.plan.cfg.attn_mode}")
        except Exception as e:  # noqa: BLE001 (a plotting failure must never stop training)
            self.display.info(f"analysis.png not drawn: {type(e).__name__}: {e}")
            return
        if upload and self.wandb is not None:
            self.wandb.image(self.out / "analysis.png", self.progress.step)

    def check_nonfinite(self, step: int) -> str | None:
        """Read the device's non-finite step record (a few bytes, at a point that syncs anyway),
        log each new one; the stop message once more than --skip-nonfinite have happened."""
        p, skip_n = self.progress, int(self.plan.config.optim.skip_nonfinite)
        count, recent = self.stepper.nonfinite_record()
        if count == p.nonfinite_seen:
            return None
        fatal = None
        first = count - len(recent)
        if first > p.nonfinite_seen:  # more than the device keeps happened between two syncs
            self.record("nonfinite", step=None, quantity=None, count=first, allowed=skip_n,
                        action="skipped" if first <= skip_n else "stop",
                        note=f"{first - p.nonfinite_seen} non-finite steps before step {recent[0][0]} not recorded")
        for i, (bad_step, kind) in enumerate(recent, start=first):
            if i < p.nonfinite_seen:
                continue
            fatal = self._record_nonfinite(bad_step, kind, i + 1, skip_n) if fatal is None else fatal
        p.nonfinite_seen = count
        if count <= skip_n:
            return None
        return self._nonfinite_message(step, fatal or (None, "loss or grad_norm", count), skip_n)

    def _record_nonfinite(self, bad_step: int, kind: int, nth: int, skip_n: int) -> tuple | None:
        """One `nonfinite` event; (step, quantity, nth) when this one is past --skip-nonfinite."""
        from train.faults import nonfinite_kind_text

        quantity, over = nonfinite_kind_text(kind), nth > skip_n
        self.record("nonfinite", step=bad_step, quantity=quantity, count=nth, allowed=skip_n,
                    action="stop" if over else "skipped")
        if over:
            return bad_step, quantity, nth
        self.display.line(f"step {bad_step}: non-finite {quantity}; the update was skipped "
                          f"({nth} of {skip_n} allowed by --skip-nonfinite)")
        return None

    def _nonfinite_message(self, step: int, fatal: tuple, skip_n: int) -> str:
        bad_step, quantity, nth = fatal
        kept = self.ckpts.latest_step("last")
        kept_txt = (f"the last good checkpoint (step {kept}) is kept in {self.ckpts.root / 'last'}" if kept is not None
                    else "no checkpoint had been written")
        allowed = f" (non-finite step {nth}; --skip-nonfinite allows {skip_n})" if skip_n else ""
        at = f"at step {bad_step}" if bad_step is not None else f"by step {step}"
        return (f"non-finite {quantity} {at}{allowed}; stopped at step {step} without saving: {kept_txt}; "
                f"lower --lr, or let --skip-nonfinite N skip such steps")

    # ---- the loop -----------------------------------------------------------------------
    def fit(self) -> int:
        """Train to --steps (or a stop signal); write `done` and the summary. Returns the exit
        status; raises a UserError (exit 1) after a fatal non-finite step, a failed checkpoint
        write or a train step too large for the device."""
        reason, failure, nonfinite_msg = "complete", None, None
        self.stop.install()
        self._announce()
        try:
            reason, nonfinite_msg = self._train_loop()
        except UserError as e:  # a checkpoint that cannot be written, a step too large for the device
            failure, reason = e, "error"
        finally:
            self.display.close()
            self.stop.restore()
        return self._finish(reason, failure, nonfinite_msg)

    def _train_loop(self) -> tuple[str, str | None]:
        c, p, steps = self.plan.config, self.progress, int(self.plan.config.steps.steps)
        if p.step < steps:
            self._compile_longest()
        self.open_log()
        if p.step >= steps:
            self.display.info(f"the run is already at step {p.step} >= --steps {steps}; nothing to train")
            return "already_complete", None
        if p.step == 0 and self.stop.reason is None:
            if self.analyzer is not None:
                self.analyse(0)
            if c.eval.every > 0:
                self.evaluate(0)
        from train.faults import fault_points

        pause_at = fault_points("pause_at_step")  # TEST-ONLY (DBA_FAULT): a window to signal a run
        batch = self._next_batch(p.step)
        self.window.reset()
        while p.step < steps and self.stop.reason is None:
            batch = self._train_step(batch)
            message = self._after_step(p.step)
            if message is not None:
                return "nonfinite", message
            if p.step in pause_at:
                self._fault_pause(p.step)
        if p.step != p.saved_last_at:
            message = self.check_nonfinite(p.step)
            if message is not None:
                return "nonfinite", message
            self.save_last(p.step)
        return self.stop.reason or "complete", None

    def _compile_longest(self) -> None:
        """The longest length this run will train at, compiled first: a step too large for the
        device fails here, before any training, with the compiled memory estimate."""
        c, step, steps = self.plan.config, self.progress.step, int(self.plan.config.steps.steps)
        schedule = c.steps.schedule
        longest = max({schedule.length_at(step)} | {n for s0, n in schedule.entries if step < s0 < steps})
        shape = (int(c.steps.grad_accum), int(c.steps.batch_size), int(longest))
        phase = self.stepper.phase_at(step)
        self._compiled_phases.add((int(longest), phase))
        dt = self.stepper.compile_for(shape, phase=phase)
        note = getattr(self.stepper, "compile_note", None)  # torch.compile fell back to eager
        if note and note not in self.notes:
            self.notes.append(note)
            self.display.line(f"  {note}")
        if dt > 0:
            need, limit = self.stepper.memory_bytes.get(shape), self.stepper.memory_limit
            mem = "" if need is None else f"; needs ~{human_bytes(need, 'iec')} per device" + (
                "" if limit is None else f" (limit {human_bytes(limit, 'iec')})")
            self.display.info(f"compiled the train step for sequence length {longest} in {dt:.1f}s "
                              f"(compile #{self.stepper.compiles}){mem}")

    def _next_batch(self, step: int):
        """This host's rows of step `step`'s batch, placed as global arrays over the mesh."""
        c = self.plan.config
        x, y = train_batch(self.plan.data.train, batch_size=int(c.steps.batch_size), grad_accum=int(c.steps.grad_accum),
                           seed=c.run.seed, seq_len=c.steps.schedule.length_at(step), step=step, rows=self.rows)
        return self.stepper.put_batch(x), self.stepper.put_batch(y)

    def _train_step(self, batch):
        """One optimizer step on `batch`; samples the next batch while the device runs it."""
        p, w, steps = self.progress, self.window, int(self.plan.config.steps.steps)
        x, y = batch
        length = x.shape[2]
        phase = self.stepper.phase_at(p.step)  # distillation's blockwise phase, else main
        if length not in p.lengths or (length, phase) not in self._compiled_phases:
            p.lengths.add(length)
            self._compiled_phases.add((length, phase))
            dt = self.stepper.compile_for(x, y, phase=phase)
            w.excluded_s += dt
            if dt > 0:
                what = f"sequence length {length}" + ("" if phase == "main" else f", {phase} distillation")
                self.display.info(f"step {p.step}: {what} -> compiled the train step in {dt:.1f}s "
                                  f"(compile #{self.stepper.compiles})")
        self.latest = (self.stepper.train_step(x, y, p.step), length)
        p.step += 1
        w.steps += 1
        w.tokens += math.prod(x.shape)  # (a jax.Array's size is an int; a torch.Tensor's a method)
        if p.step % self.plan.config.display.log_every == 0:
            self.stop.sync()  # multi-process: every process sees a signal at the same step
        if p.step >= steps:
            return None
        t0 = time.perf_counter()
        batch = self._next_batch(p.step)
        w.data_s += time.perf_counter() - t0
        return batch

    def _after_step(self, step: int) -> str | None:
        """The hooks due at `step`: first those that do not read the trained state (log, display),
        then, if anything synced, the non-finite check, then evaluation, analysis and saves.
        Returns the stop message of a fatal non-finite step."""
        due = self.hooks.due(step, int(self.plan.config.steps.steps), self.stop.reason is not None)
        for h in due:
            if not h.reads_state:
                h.fn(step)
        if any(h.syncs for h in due):  # the device syncs here anyway
            message = self.check_nonfinite(step)
            if message is not None:
                return message
        guarded = [h for h in due if h.reads_state]
        for h in guarded:
            h.fn(step)
        if any(h.syncs for h in guarded):
            self.window.reset()
        return None

    def _fault_pause(self, step: int) -> None:
        self.display.line(f"DBA_FAULT: paused at step {step}")
        end = time.monotonic() + 120.0
        while not self.stop.requested and time.monotonic() < end:
            time.sleep(0.02)

    # ---- start and end ----------------------------------------------------------------------
    def open_log(self) -> None:
        from dba.runlog import JsonlLog

        c = self.plan.config
        self.log = JsonlLog(self.out / "train.jsonl") if self.main else Silent()
        meta = self.log.write(
            "meta", argv=list(self.argv), command=self.command, run_dir=str(self.out), run_name=self.name,
            flags=c.to_flags(), args=c.to_flags(), explicit=sorted(c.explicit), config=self.plan.cfg.to_dict(),
            env=self.env,
            n_params=self.plan.cfg.num_params(), context=self.plan.context,
            resumed_from=self.progress.step if self.plan.resume_meta is not None else None,
            init_from=self.plan.init_info["source"] if self.plan.init_info else None,
            data=self.plan.data.record(c.data.path),
            dtypes={"param": c.precision.param_dtype, "compute": _NUMPY_NAMES[c.precision.compute_dtype],
                    "grad_checkpoint": bool(c.precision.grad_checkpoint)},
            noop_flags=c.noop_flags(), mesh=self.backend.mesh_shape,
            process_count=self.backend.process_count, backend=self.backend.name)
        if meta is not None:  # the writer process
            self._start_wandb(meta)

    def _start_wandb(self, meta: dict[str, Any]) -> None:
        """--wandb: the W&B run, its config the `meta` record (a problem is one warning line)."""
        from train.wandb_log import start_wandb

        config = {k: v for k, v in meta.items() if k not in ("type", "event", "time", "flags")}
        self.wandb = start_wandb(self.plan.config.wandb, out_dir=self.out, name=self.name, config=config,
                                 resume_id=self.wandb_id, say=self.display.line)
        if self.wandb is not None:
            self.wandb_id = self.wandb.id

    def _announce(self) -> None:
        from train.faults import FAULT_ENV

        c, cfg, d, ctx = self.plan.config, self.plan.cfg, self.display, self.plan.context
        grow_txt = (f" (grown from {ctx['requested_block_size']} to cover the longest trained length)"
                    if ctx["grown"] else "")
        note = self.plan.framework_note  # why this framework trains, when the flags did not say
        d.line(f"dba train: run dir {self.out}" + (f" | {note}" if note else ""))
        if os.environ.get(FAULT_ENV):
            d.line(f"  {FAULT_ENV}={os.environ[FAULT_ENV]}: test-only fault injection is active")
        d.line(f"  model {cfg.attn_mode} d_model {cfg.d_model} layers {cfg.n_layer} heads {cfg.n_head} "
               f"vocab {cfg.vocab_size}: {cfg.num_params():,} params | context {cfg.block_size}{grow_txt}")
        d.line(f"  data {len(self.plan.data.train):,} train / {len(self.plan.data.val):,} val tokens | "
               f"{c.optim.name} lr {c.optim.lr:g} ({c.optim.lr_schedule}) | batch {c.steps.batch_size} x "
               f"accum {c.steps.grad_accum} | seq {', '.join(f'{L}@{s}' for s, L in ctx['boundaries'])} | "
               f"steps {self.progress.step}->{c.steps.steps} | {self.backend.device_text(self.env)}")
        for line in self.notes:  # the backend's (mesh, initial weights, compile fallback) and the resume's
            d.line(f"  {line}")

    def _finish(self, reason: str, failure: UserError | None, nonfinite_msg: str | None) -> int:
        """`done`, the final plot and `summary.md`; the exit status (raises the run's error)."""

        p, wall = self.progress, time.time() - self.t_start
        error_text = str(failure) if failure is not None else nonfinite_msg
        try:
            if failure is not None and isinstance(self.log, Silent) and self.main:  # before the run started
                self.ckpts.close()  # leave no run: the corrected command runs as is
                raise failure
            self._write_done(reason, wall, error_text)
        except UserError:  # e.g. the disk is still full: report the first error
            if failure is None:
                raise
            self.ckpts.close()
        if failure is not None:
            raise failure
        best = p.best_val
        best_txt = f"best val {best:.4f} (ppl {math.exp(best):.2f})" if best is not None else "no eval"
        self.display.line(f"dba train: {reason} at step {p.step}, {best_txt}, {wall:.0f}s | run dir {self.out}")
        if nonfinite_msg is not None:
            raise UserError(nonfinite_msg, 1)
        return EXIT_CODES.get(reason, 1)

    def _write_done(self, reason: str, wall: float, error_text: str | None) -> None:
        from train.artifacts import write_summary

        p, st = self.progress, self.stepper
        self.record("done", reason=reason, step=p.step, best_val=p.best_val, best_step=p.best_step, wall_s=wall,
                    compiles=st.compiles, trace_count=st.trace_count, compile_s=st.compile_s,
                    lengths=sorted(p.lengths), skipped_nonfinite=p.nonfinite_seen,
                    step_memory_mb=max(st.memory_bytes.values(), default=0) / 2**20 or None,
                    **({"error": error_text} if error_text else {}))
        self.log.close()
        if self.tb is not None:
            self.tb.close()
        if self.plot_stale:  # (the last evaluation usually drew it already)
            self.redraw_plot()
        if self.wandb is not None:
            self.wandb.close()
        self.ckpts.close()
        if self.main:
            write_summary(self.out, created=self.created, command=self.command, env=self.env, cfg=self.plan.cfg,
                          flags=self.plan.config.to_flags(), policy=self.plan.config.kv,
                          results={"step": p.step, "best_val": p.best_val, "reason": reason, "wall_s": wall},
                          context=self.plan.context)
