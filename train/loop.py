"""The training loop of `dba train`.

Batches come from dba.data.sample_batch keyed by (seed, step, stream): micro-batch i of an
accumulated step uses stream i, evaluation uses its own streams with fixed batches per eval
index, so a resumed run draws exactly the batches an uninterrupted one would. The device only
syncs at log, eval and save steps; the next batch is sampled on the host while the device runs
the current step (JAX dispatch is asynchronous).

Faults: a step with a non-finite loss or gradient norm applies no update (train/step.py) and is
counted on the device; at the next point where the loop syncs anyway (log, analysis, eval, save)
the count is read: each such step gets a `nonfinite` event, and once more than
`--skip-nonfinite` of them have happened the run stops before it evaluates or saves anything
(the last good checkpoint stays the latest), records `done` with reason `nonfinite` and fails
with a one-line error (exit 1). A checkpoint that cannot be written (disk full) or a train step
that cannot fit in device memory (checked when it compiles; the longest sequence length of the
run is compiled first, before the first step) is a one-line error too, after a `done` event
with reason `error`. SIGINT/SIGTERM save the last checkpoint and stop (exit 130/143).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import shlex
import signal
import shutil
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from dba.config import ModelConfig
from dba.errors import UserError
from train.args import parse_betas, resolve_model, schedule_from

EVAL_VAL_STREAM = 1_000_003
EVAL_TRAIN_STREAM = 1_000_033
RUN_FILES = ("train.jsonl", "summary.md", "best.safetensors", "last.safetensors")
EXIT_CODES = {"complete": 0, "already_complete": 0, "sigint": 130, "sigterm": 143, "nonfinite": 1, "error": 1}


def holds_run(out_dir: Path) -> bool:
    return out_dir.is_dir() and (any((out_dir / n).exists() for n in RUN_FILES) or (out_dir / "checkpoints").exists())


def clear_run(out_dir: Path) -> None:
    """--overwrite: remove our files only (never the directory itself or anything else in it)."""
    for n in RUN_FILES:
        for p in (out_dir / n, out_dir / f"{n}.tmp"):  # .tmp: a write cut short by a kill
            if p.exists():
                p.unlink()
    if (out_dir / "checkpoints").is_dir():
        shutil.rmtree(out_dir / "checkpoints")


class _Stop:
    """SIGINT/SIGTERM set a flag; the loop saves and stops after the current step."""

    _CODES: ClassVar[dict[str, int]] = {"sigint": 1, "sigterm": 2}

    def __init__(self, shared: bool = False):
        self.reason: str | None = None
        # Multi-process: a signal may reach one host only, and a process that stopped alone would
        # hang the others in the next collective; it becomes `reason` when all agree (`sync`).
        self.shared = shared
        self.pending: str | None = None
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, name in ((signal.SIGINT, "sigint"), (signal.SIGTERM, "sigterm")):
            self._old[sig] = signal.getsignal(sig)

            def handler(signum, frame, name=name):
                if self.reason is not None or self.pending is not None:  # a second signal: stop now
                    raise KeyboardInterrupt
                if self.shared:
                    self.pending = name
                else:
                    self.reason = name
                print(f"\n{name.upper()} received: saving the last checkpoint and stopping "
                      f"(send again to abort without saving)", flush=True)

            signal.signal(sig, handler)

    def sync(self) -> None:
        """Multi-process: adopt a signal any process received (a collective: all call it)."""
        if not self.shared or self.reason is not None:
            return
        from train.distributed import agree

        code = agree(self._CODES.get(self.pending, 0))
        if code:
            self.reason = {v: k for k, v in self._CODES.items()}[code]

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


def _dtypes(flags: dict[str, Any]):
    import jax.numpy as jnp

    param = jnp.bfloat16 if flags["param_dtype"] == "bf16" else jnp.float32
    if flags["amp"]:
        compute = jnp.bfloat16 if flags["amp_dtype"] == "bf16" else jnp.float16
    else:
        compute = param
    return compute, param


def build_tx(flags: dict[str, Any]):
    from train.optim import build_optimizer

    opt = flags["optimizer"]
    betas = parse_betas(flags["adam_betas"] if opt == "adamw" else flags["lion_betas"],
                        "adam_betas" if opt == "adamw" else "lion_betas")
    return build_optimizer(opt, lr=flags["lr"], total_steps=int(flags["steps"]), betas=betas,
                           eps=flags["adam_eps"], weight_decay=flags["weight_decay"],
                           wd_exempt_1d=flags["wd_exempt_1d"], grad_clip=flags["grad_clip"],
                           lr_schedule=flags["lr_schedule"], warmup_steps=flags["warmup_steps"],
                           min_lr=flags["min_lr"])


def train_batch(tokens: np.ndarray, flags: dict[str, Any], seq_len: int, step: int, rows: slice | None = None):
    """(x, y) int32 (A, B, T): the grad_accum micro-batches of optimizer step `step` (only the
    batch rows `rows` when given: this host's share of the global batch)."""
    from dba.data import sample_batch

    b, a, seed = int(flags["batch_size"]), int(flags["grad_accum"]), int(flags["seed"])
    pairs = [sample_batch(tokens, b, seq_len, seed, step, stream=i, rows=rows) for i in range(a)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def eval_batches(tokens: np.ndarray, flags: dict[str, Any], seq_len: int, stream: int, rows: slice | None = None):
    """(X, Y) int32 (N, B, T): batch i is fixed by (seed, i), the same at every evaluation."""
    from dba.data import sample_batch

    b, n, seed = int(flags["batch_size"]), int(flags["eval_iters"]), int(flags["seed"])
    pairs = [sample_batch(tokens, b, seq_len, seed, i, stream=stream, rows=rows) for i in range(n)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def run_training(flags: dict[str, Any], explicit: dict[str, Any], out_dir: str, run_name: str,
                 argv: list[str], resume_meta: dict[str, Any] | None = None) -> int:
    """Train; returns the exit status (0 done, 130/143 interrupted). Raises a UserError (exit 1)
    after a non-finite step beyond --skip-nonfinite, a failed checkpoint write or a train step too
    large for the device, each after writing the `done` event and summary."""
    t_start = time.time()
    created = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    from dba.data import check_enough, load_tokens, split_train_val

    # ---- data and config ------------------------------------------------------------------
    tokens, vocab, tok = load_tokens(flags["data"], data_format=flags["data_format"],
                                     data_dtype=flags["data_dtype"], tokenizer=flags["tokenizer"],
                                     vocab_size=flags["vocab_size"])
    train_tok, val_tok = split_train_val(tokens, flags["val_frac"])
    schedule = schedule_from(flags)
    steps = int(flags["steps"])

    ckpt_cfg = ckpt_state = ckpt_info = None
    if flags["ckpt"] and resume_meta is None:
        from dba.checkpoints import read_weights

        ckpt_cfg, ckpt_state, ckpt_info = read_weights(flags["ckpt"])
    if resume_meta is not None:
        ckpt_cfg = ModelConfig.from_dict(resume_meta["config"])
    cfg, context = resolve_model(flags, explicit if resume_meta is None else {}, vocab, schedule, ckpt_cfg)
    longest_train = schedule.max_length(steps)
    longest_eval = int(flags["eval_seq_len"]) or longest_train
    check_enough(train_tok, longest_train, "the train split")
    check_enough(val_tok, longest_eval, "the validation split")

    from train.analysis import spec_from_flags

    analysis_spec = spec_from_flags(flags, cfg)
    if flags["tb"]:
        try:
            import tensorboardX  # noqa: F401
        except ImportError:
            raise UserError("--tb needs tensorboardX, which is not installed: pip install 'dba[tb]' "
                            "(or pip install tensorboardX)", 2) from None

    if flags["print_config"]:
        print(json.dumps({"model": cfg.to_dict(), "args": flags, "context": context,
                          "run_dir": out_dir}, indent=2, sort_keys=True, default=str))
        return 0

    # ---- JAX side ---------------------------------------------------------------------------
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jax_model import DBAModel, load_canonical, save_export
    from train import sharding
    from train.artifacts import JsonlLog, device_line, environment, write_summary
    from train.checkpointing import RunCheckpoints
    from train.distributed import Silent, host_params, is_main
    from train.progress import make_display
    from train.resources import device_memory, host_rss_bytes
    from train.step import FAULT_ENV, Stepper, fault_points, fmt_bytes, nonfinite_kind_text

    if flags["matmul_precision"] != "high" or "matmul_precision" in explicit:
        jax.config.update("jax_default_matmul_precision",
                          {"highest": "highest", "high": "high", "medium": "bfloat16"}[flags["matmul_precision"]])
    try:
        env = environment()
    except Exception as e:  # e.g. --device gpu without a GPU or without jax[cuda]
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"--device {flags['device']}: JAX cannot use this platform here ({first}); "
                        f"install the matching jax build (e.g. jax[cuda12]) or use --device cpu", 1) from None
    # The mesh is checked against the devices here, before anything is built or compiled.
    mesh = sharding.make_mesh(sharding.parse_mesh(flags["mesh"]))
    if mesh.size != jax.device_count() and jax.process_count() > 1:
        raise UserError(f"{jax.process_count()} processes need a --mesh over all {jax.device_count()} devices, "
                        f"e.g. --mesh data=-1 (data parallel) or --mesh fsdp=-1 (sharded state)")
    mesh_shape = sharding.mesh_shape(mesh)
    sharding.check_batch(mesh_shape, int(flags["batch_size"]))  # again: a -1 axis is now resolved
    main = is_main()  # process 0 writes the run directory's files; every process computes

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpts = RunCheckpoints(out)
    compute_dtype, param_dtype = _dtypes(flags)
    seed = int(flags["seed"])
    model = DBAModel(cfg, rngs=nnx.Rngs(seed), dtype=compute_dtype, param_dtype=param_dtype,
                     remat=bool(flags["grad_checkpoint"]))
    if ckpt_state is not None:
        load_canonical(model, ckpt_state, ckpt_info["source"])
    tx = build_tx(flags)
    stepper = Stepper(model, tx, seed=seed, mesh=mesh)
    del model
    rows = stepper.local_rows(int(flags["batch_size"]))  # this host's share of every batch

    start_step, best_val, best_step = 0, None, None
    resharded = None
    if resume_meta is not None:
        # Restored straight onto this run's shardings, whatever mesh wrote the checkpoint.
        params, opt_state, start_step, meta = ckpts.restore("last", stepper.params, stepper.opt_state)
        stepper.set_state(params, opt_state)
        best_val, best_step = meta.get("best_val"), meta.get("best_step")
        stepper.set_nonfinite_count(int(meta.get("skipped_nonfinite") or 0))
        saved_mesh = (meta.get("devices") or {}).get("mesh")
        if saved_mesh and saved_mesh != mesh_shape:
            resharded = saved_mesh

    tok_dict = tok.to_dict() if tok is not None else None
    n_params = cfg.num_params()
    # train.jsonl is opened once the train step has compiled (see the loop): a step too large for
    # the device fails before the run directory holds a run, so the corrected command runs as is.
    log: Any = Silent()
    command = "dba train" + ("" if not argv else " " + shlex.join(argv))

    def open_log() -> None:
        nonlocal log
        log = JsonlLog(out / "train.jsonl") if main else Silent()
        log.write("meta", argv=list(argv), command=command, run_dir=str(out), run_name=run_name, flags=flags,
                  explicit=sorted(explicit), config=cfg.to_dict(), env=env, n_params=n_params, context=context,
                  resumed_from=start_step if resume_meta is not None else None,
                  init_from=ckpt_info["source"] if ckpt_info else None,
                  data={"path": flags["data"] or "default corpus (pydoc_data.topics)", "tokens": int(len(tokens)),
                        "train_tokens": int(len(train_tok)), "val_tokens": int(len(val_tok)),
                        "vocab_size": int(vocab), "tokenizer": tok_dict},
                  dtypes={"param": flags["param_dtype"], "compute": str(np.dtype(compute_dtype)) if compute_dtype is not None else None,
                          "grad_checkpoint": bool(flags["grad_checkpoint"])},
                  noop_flags={k: flags[k] for k in sorted(explicit) if k in _noop_names()},
                  mesh=mesh_shape, process_count=jax.process_count())

    skip_n = int(flags.get("skip_nonfinite") or 0)
    nonfinite_seen = int(meta.get("skipped_nonfinite") or 0) if resume_meta is not None else 0

    def meta_for(step: int) -> dict[str, Any]:
        return {"config": cfg.to_dict(), "flags": flags, "step": step, "seed": seed, "best_val": best_val,
                "best_step": best_step, "tokenizer": tok_dict, "context": context, "run_name": run_name,
                "skipped_nonfinite": nonfinite_seen}

    def export(kind: str, step: int, val: float | None) -> None:
        extra = {"step": str(step), "kind": kind, "run_dir": str(out)}
        if val is not None:
            extra["val_loss"] = repr(float(val))
        if tok_dict is not None:
            extra["tokenizer"] = json.dumps(tok_dict)
        params = host_params(stepper.params)  # every process: gathers shards held by other hosts
        if main:
            path = out / f"{kind}.safetensors"
            try:  # written to a temporary name and renamed (dba.weights.save_safetensors)
                save_export(path, nnx.merge(stepper.graphdef, params, stepper.rest), extra)
            except OSError as e:
                path.with_name(path.name + ".tmp").unlink(missing_ok=True)
                why = os.strerror(e.errno) if e.errno else str(e)
                raise UserError(f"cannot write {path} (step {step}): {why}; the checkpoint of step {step} "
                                f"under {ckpts.root / kind} was written", 1) from None

    def save(kind: str, step: int, val: float | None = None) -> None:
        ckpts.save(kind, step, stepper.params, stepper.opt_state, seed, meta_for(step))
        export(kind, step, val)

    display = make_display(flags["live"], steps, start_step) if main else Silent()
    tb = None
    if flags["tb"] and main:
        from train.tensorboard import TBWriter

        tb = TBWriter(out / "tb")
    analyzer = store = analysis_x = None
    if analysis_spec is not None:
        from train.analysis import Analyzer, analysis_tokens
        from train.analysis_store import AnalysisStore

        analyzer = Analyzer(analysis_spec, stepper.graphdef, stepper.rest, cfg)
        store = AnalysisStore(out / "analysis.h5", save_matrices=analysis_spec.save_matrices,
                              save_svals=analysis_spec.save_svals) if main else Silent()
        # a global (replicated) array: the analysis runs on every process's devices
        analysis_x = jax.device_put(analysis_tokens(val_tok, analysis_spec, cfg.block_size, seed),
                                    stepper.replicated)

    plot_stale = [False]  # events the plot draws were logged since analysis.png was drawn

    def record(event: str, **fields) -> dict[str, Any]:
        if event in ("train", "eval", "analysis"):
            plot_stale[0] = True
        rec = log.write(event, **fields)
        if tb is not None and rec is not None:
            tb.event(rec)
        return rec

    def analyse(step: int) -> None:
        t0 = time.perf_counter()
        metrics, arrays = analyzer(stepper.params, analysis_x)
        # analysis.h5 first: every analysis event in train.jsonl then has its group in the file
        store.append(step, metrics, arrays, analysis_spec.layers, analysis_spec.heads)
        took = time.perf_counter() - t0
        rec = record("analysis", step=step, seq_len=int(analysis_x.shape[1]), level=analysis_spec.level,
                     layers=list(analysis_spec.layers), heads=list(analysis_spec.heads), **metrics, analysis_s=took)
        display.set_timing(analysis_s=took)
        display.analysis(rec)

    def redraw_plot() -> None:
        if not main:
            return
        from dba.plots import plot_run
        from train.artifacts import read_events

        plot_stale[0] = False
        try:
            plot_run(read_events(out / "train.jsonl"), out / "analysis.png", title=f"{run_name}: {cfg.attn_mode}")
        except Exception as e:  # noqa: BLE001 (a plotting failure must never stop training)
            display.info(f"analysis.png not drawn: {type(e).__name__}: {e}")

    def check_nonfinite(step: int) -> str | None:
        """Read the device's non-finite step record (a few bytes, at a point that syncs anyway),
        log each new one; the stop message once more than --skip-nonfinite have happened."""
        nonlocal nonfinite_seen
        count, recent = stepper.nonfinite_record()
        if count == nonfinite_seen:
            return None
        fatal = None
        first = count - len(recent)
        if first > nonfinite_seen:  # more than the device keeps happened between two syncs
            record("nonfinite", step=None, quantity=None, count=first, allowed=skip_n,
                   action="skipped" if first <= skip_n else "stop",
                   note=f"{first - nonfinite_seen} non-finite steps before step {recent[0][0]} not recorded")
        for i, (bad_step, kind) in enumerate(recent, start=first):
            if i < nonfinite_seen:
                continue
            quantity, over = nonfinite_kind_text(kind), i + 1 > skip_n
            record("nonfinite", step=bad_step, quantity=quantity, count=i + 1, allowed=skip_n,
                   action="stop" if over else "skipped")
            if over and fatal is None:
                fatal = (bad_step, quantity, i + 1)
            elif not over:
                display.line(f"step {bad_step}: non-finite {quantity}; the update was skipped "
                             f"({i + 1} of {skip_n} allowed by --skip-nonfinite)")
        nonfinite_seen = count
        if count <= skip_n:
            return None
        bad_step, quantity, nth = fatal if fatal is not None else (None, "loss or grad_norm", count)
        kept = ckpts.latest_step("last")
        kept_txt = (f"the last good checkpoint (step {kept}) is kept in {ckpts.root / 'last'}" if kept is not None
                    else "no checkpoint had been written")
        allowed = (f" (non-finite step {nth}; --skip-nonfinite allows {skip_n})" if skip_n
                   else "")
        at = f"at step {bad_step}" if bad_step is not None else f"by step {step}"
        return (f"non-finite {quantity} {at}{allowed}; stopped at step {step} without saving: {kept_txt}; "
                f"lower --lr, or let --skip-nonfinite N skip such steps")

    pause_at = fault_points("pause_at_step")  # TEST-ONLY (DBA_FAULT): a window to signal a run

    def fault_pause(step: int) -> None:
        display.line(f"DBA_FAULT: paused at step {step}")
        end = time.monotonic() + 120.0
        while stop.reason is None and stop.pending is None and time.monotonic() < end:
            time.sleep(0.02)

    stop = _Stop(shared=jax.process_count() > 1)
    stop.install()
    grow_txt = (f" (grown from {context['requested_block_size']} to cover the longest trained length)"
                if context["grown"] else "")
    display.line(f"dba train: run dir {out}")
    if os.environ.get(FAULT_ENV):
        display.line(f"  {FAULT_ENV}={os.environ[FAULT_ENV]}: test-only fault injection is active")
    display.line(f"  model {cfg.attn_mode} d_model {cfg.d_model} layers {cfg.n_layer} heads {cfg.n_head} "
                 f"vocab {cfg.vocab_size}: {n_params:,} params | context {cfg.block_size}{grow_txt}")
    display.line(f"  data {len(train_tok):,} train / {len(val_tok):,} val tokens | "
                 f"{flags['optimizer']} lr {flags['lr']:g} ({flags['lr_schedule']}) | batch {flags['batch_size']} x "
                 f"accum {flags['grad_accum']} | seq {', '.join(f'{L}@{s}' for s, L in context['boundaries'])} | "
                 f"steps {start_step}->{steps} | {device_line(env)}")
    if mesh.size > 1 or jax.process_count() > 1:
        display.line(f"  mesh {sharding.mesh_text(mesh_shape)} over {mesh.size} devices"
                     + (f" on {jax.process_count()} processes" if jax.process_count() > 1 else "")
                     + f": batch rows split {sharding.batch_ways(mesh_shape)} ways, parameters and optimizer "
                       f"state {mesh_shape['fsdp']} ways")
    if resharded:
        display.line(f"  resumed from a checkpoint written on mesh {sharding.mesh_text(resharded)}: "
                     f"resharded onto {sharding.mesh_text(mesh_shape)}")

    # ---- eval ---------------------------------------------------------------------------
    eval_cache: dict[int, tuple] = {}

    def evaluate(step: int) -> dict[str, Any]:
        nonlocal best_val, best_step
        length = int(flags["eval_seq_len"]) or schedule.length_at(max(step - 1, 0))
        if length not in eval_cache:
            xv, yv = eval_batches(val_tok, flags, length, EVAL_VAL_STREAM, rows)
            xt, yt = eval_batches(train_tok, flags, length, EVAL_TRAIN_STREAM, rows)
            eval_cache[length] = tuple(stepper.put_batch(a) for a in (xv, yv, xt, yt))
        xv, yv, xt, yt = eval_cache[length]
        t_eval = time.perf_counter()
        val_loss, train_loss = (float(v) for v in jax.device_get((stepper.eval_loss(xv, yv),
                                                                  stepper.eval_loss(xt, yt))))
        new_best = step > 0 and math.isfinite(val_loss) and (best_val is None or val_loss < best_val)
        if new_best:
            best_val, best_step = val_loss, step
        eval_s = time.perf_counter() - t_eval
        rec = record("eval", step=step, train_loss=train_loss, val_loss=val_loss,
                     val_ppl=math.exp(min(val_loss, 700.0)), best_val=best_val, seq_len=length, eval_s=eval_s)
        display.set_timing(eval_s=eval_s)
        display.eval(rec)
        if new_best:
            save("best", step, val_loss)
        redraw_plot()
        return rec

    # ---- loop ---------------------------------------------------------------------------
    reason = "complete"
    failure: UserError | None = None
    nonfinite_msg: str | None = None
    seen_lengths: set[int] = set()
    step = start_step
    log_every, eval_every, save_every = int(flags["log_every"]), int(flags["eval_every"]), int(flags["save_every"])
    upd_every = int(flags["live_update_every"])
    saved_last_at = start_step if resume_meta is not None else None
    try:
        if step < steps:
            # The longest length this run will train at, compiled first: a step too large for the
            # device fails here, before any training, with the compiled memory estimate.
            longest = max({schedule.length_at(step)} | {n for s0, n in schedule.entries if step < s0 < steps})
            shape = (int(flags["grad_accum"]), int(flags["batch_size"]), int(longest))
            spec = jax.ShapeDtypeStruct(shape, jnp.int32)
            dt = stepper.compile_for(spec, spec)
            if dt > 0:
                need, limit = stepper.memory_bytes.get(shape), stepper.memory_limit
                mem = "" if need is None else f"; needs ~{fmt_bytes(need)} per device" + (
                    "" if limit is None else f" (limit {fmt_bytes(limit)})")
                display.info(f"compiled the train step for sequence length {longest} in {dt:.1f}s "
                             f"(compile #{stepper.compiles}){mem}")
        open_log()
        if step >= steps:
            reason = "already_complete"
            display.info(f"the run is already at step {step} >= --steps {steps}; nothing to train")
        elif step == 0 and stop.reason is None:
            if analyzer is not None:
                analyse(0)
            if eval_every > 0:
                evaluate(0)

        def next_train_batch(i: int):  # this host's rows, placed as global arrays over the mesh
            x_, y_ = train_batch(train_tok, flags, schedule.length_at(i), i, rows)
            return stepper.put_batch(x_), stepper.put_batch(y_)

        next_batch = next_train_batch(step) if step < steps else None
        t_mark, steps_since, tokens_since, excluded = time.perf_counter(), 0, 0, 0.0
        data_s = 0.0
        while step < steps and stop.reason is None:
            x, y = next_batch
            length = x.shape[2]
            if length not in seen_lengths:
                seen_lengths.add(length)
                dt = stepper.compile_for(x, y)
                excluded += dt
                if dt > 0:
                    display.info(f"step {step}: sequence length {length} -> compiled the train step in {dt:.1f}s "
                                 f"(compile #{stepper.compiles})")
            metrics = stepper.train_step(x, y, step)
            step += 1
            steps_since += 1
            if step % log_every == 0:
                stop.sync()  # multi-process: every process sees a signal at the same step
            tokens_since += x.size
            if step < steps:  # sample the next batch while the device runs this step
                t_data = time.perf_counter()
                next_batch = next_train_batch(step)
                data_s += time.perf_counter() - t_data
            log_now = step % log_every == 0 or step == steps or stop.reason is not None
            do_analysis = (analyzer is not None and (step % analysis_spec.every == 0 or step == steps)
                           and stop.reason is None)
            do_eval = ((eval_every > 0 and (step % eval_every == 0 or step == steps) and stop.reason is None)
                       or (eval_every == 0 and step == steps))
            do_save = save_every > 0 and step % save_every == 0 and step < steps and stop.reason is None
            if log_now:
                m = jax.device_get(metrics)
                elapsed = max(time.perf_counter() - t_mark - excluded, 1e-9)
                loss = float(m["loss"])
                rss, rss_peak = host_rss_bytes()
                dev_mem = device_memory()
                groups = {k: float(v) for k, v in m.items() if k.startswith("grad_norm_")}
                fields = dict(step=step, loss=loss, ppl=math.exp(min(loss, 700.0)), lr=float(m["lr"]),
                              tok_s=tokens_since / elapsed, seq_len=int(length), grad_accum=int(flags["grad_accum"]),
                              global_batch=int(flags["batch_size"]) * int(flags["grad_accum"]),
                              step_ms=1000.0 * elapsed / steps_since, data_ms=1000.0 * data_s / steps_since,
                              grad_norm_total=float(m["grad_norm"]), **groups,
                              skipped_nonfinite=int(m["nonfinite_count"]), compiles=stepper.compiles,
                              host_rss_mb=None if rss is None else rss / 2**20, host_peak_mb=rss_peak / 2**20,
                              device_mem_mb=None if dev_mem is None else dev_mem.get("bytes_in_use", 0) / 2**20)
                rec = record("train", **fields)
                display.set_timing(compile_s=stepper.compile_s)
                # the log writes NaN as null; the display shows it as nan
                display.train({**(rec or {}), **{k: v for k, v in fields.items() if isinstance(v, float)}})
                if flags["live_plot"]:
                    redraw_plot()
                t_mark, steps_since, tokens_since, excluded, data_s = time.perf_counter(), 0, 0, 0.0, 0.0
            elif step % upd_every == 0:
                display.advance(step)
            if log_now or do_analysis or do_eval or do_save:  # the device syncs here anyway
                nonfinite_msg = check_nonfinite(step)
                if nonfinite_msg is not None:
                    reason = "nonfinite"
                    break
            synced = False
            if do_analysis:
                analyse(step)
                synced = True
            if do_eval:
                evaluate(step)
                synced = True
            if do_save:
                save("last", step)
                saved_last_at = step
                synced = True
            if synced:
                t_mark, steps_since, tokens_since, excluded, data_s = time.perf_counter(), 0, 0, 0.0, 0.0
            if step in pause_at:
                fault_pause(step)
        if stop.reason is not None and reason in ("complete", "already_complete"):
            reason = stop.reason
        if reason != "nonfinite" and step != saved_last_at:
            nonfinite_msg = check_nonfinite(step)
            if nonfinite_msg is not None:
                reason = "nonfinite"
            else:
                save("last", step)
    except UserError as e:  # a checkpoint that cannot be written, a step too large for the device
        failure, reason = e, "error"
    finally:
        display.close()
        stop.restore()
    wall = time.time() - t_start
    error_text = str(failure) if failure is not None else nonfinite_msg
    try:
        if failure is not None and isinstance(log, Silent) and main:  # before the run started: leave no run
            ckpts.close()
            raise failure
        record("done", reason=reason, step=step, best_val=best_val, best_step=best_step, wall_s=wall,
               compiles=stepper.compiles, trace_count=stepper.trace_count, compile_s=stepper.compile_s,
               lengths=sorted(seen_lengths) if step > start_step else [], skipped_nonfinite=nonfinite_seen,
               step_memory_mb=max(stepper.memory_bytes.values(), default=0) / 2**20 or None,
               **({"error": error_text} if error_text else {}))
        log.close()
        if tb is not None:
            tb.close()
        if plot_stale[0]:  # (the last evaluation usually drew it already)
            redraw_plot()
        ckpts.close()
        if main:
            write_summary(out, created=created, command=command, env=env, cfg=cfg, flags=flags,
                          results={"step": step, "best_val": best_val, "reason": reason, "wall_s": wall},
                          context=context)
    except UserError:  # e.g. the disk is still full: report the first error
        if failure is None:
            raise
        ckpts.close()
    if failure is not None:
        raise failure
    best_txt = f"best val {best_val:.4f} (ppl {math.exp(best_val):.2f})" if best_val is not None else "no eval"
    display.line(f"dba train: {reason} at step {step}, {best_txt}, {wall:.0f}s | run dir {out}")
    if nonfinite_msg is not None:
        raise UserError(nonfinite_msg, 1)
    return EXIT_CODES.get(reason, 1)


def _noop_names() -> set[str]:
    from train.args import FLAGS

    return {f.name for f in FLAGS if f.noop}
