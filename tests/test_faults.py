"""Faults in `dba train`: crashes, full disks, non-finite steps and oversized steps.

- Exact resume under fault injection: one run is driven through a chain of faults, each followed
  by `--resume` - SIGKILL inside the first save, SIGKILL inside an Orbax save (files written,
  commit not yet done) with an earlier checkpoint on disk, SIGKILL just after a save committed, a full disk (ENOSPC) during a save, a NaN loss, an external SIGKILL
  while the run sits between steps, an external SIGTERM - and every resumed leg must continue
  from the checkpoint that the fault left as the latest. The losses it logs, and the final
  parameters, must equal those of one uninterrupted run bit for bit (CPU, fp32, same seed).
- `--skip-nonfinite N` skips up to N non-finite steps (the update is not applied) and stops at
  the next, keeping the last good checkpoint; the count carries over a resume.
- A train step whose compiled memory estimate exceeds the device's memory fails when it compiles,
  with the estimate in a one-line error, before the run directory holds a run.

Faults are injected with the test-only DBA_FAULT hooks (train/step.py `fault_points`): they act
inside the real code paths (Orbax's own commit of its temporary directory, the jitted step).
Runs go through a subprocess (`python -m cli train ...`) like a user's would.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest

from dba.runlog import read_events
from tests.support import TINY, ckpt_steps, dba_train, export_step, legs, one_line_error, popen_train

pytestmark = pytest.mark.slow  # runs of `dba train` in subprocesses, killed and resumed

STEPS = 12
TMP_SUFFIX = ".orbax-checkpoint-tmp"


def signal_when_paused(args, fault, sig, timeout=300):
    """Run with a DBA_FAULT pause_at_step hook; send `sig` from outside once the run says it is
    paused (between two steps, its train event written). Returns (exit status, output)."""
    p = popen_train(*args, fault=fault)
    seen = []
    for line in p.stdout:
        seen.append(line)
        if line.startswith("DBA_FAULT: paused at step"):
            p.send_signal(sig)
            break
    rest, _ = p.communicate(timeout=timeout)
    return p.returncode, "".join(seen) + (rest or "")


def tmp_dirs(out):
    return sorted(str(p.relative_to(out)) for p in (Path(out) / "checkpoints").glob(f"*/*{TMP_SUFFIX}"))


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    """The uninterrupted run every faulted run must reproduce."""
    out = tmp_path_factory.mktemp("runs") / "straight"
    r = dba_train("--data", data, "--steps", STEPS, *TINY, "--out-dir", out)
    assert r.returncode == 0, r.stdout + r.stderr
    ev = read_events(out / "train.jsonl")
    train = {e["step"]: e for e in ev if e["event"] == "train"}
    evals = {e["step"]: e for e in ev if e["event"] == "eval"}
    assert sorted(train) == list(range(1, STEPS + 1)) and sorted(evals) == [0, 6, 12]
    return out, train, evals


# ---- exact resume through a chain of injected faults -----------------------------------

def test_faults_then_resume_equal_straight_run(straight, data, tmp_path):
    ref, ref_train, ref_evals = straight
    out = tmp_path / "faulted"
    first = ["--data", data, "--steps", STEPS, *TINY, "--out-dir", out]
    resume = ["--out-dir", out, "--resume", "--steps", STEPS, "--live", "basic"]
    faults = resumes = 0
    kill_points: list[str] = []
    poisoned: set[tuple[int, int]] = set()  # (leg, step): a loss a fault made NaN on purpose

    # 0. SIGKILL inside the very first save ('last' at 2): no checkpoint is left, only Orbax's
    #    temporary directory; --resume then starts the run over.
    r = dba_train(*first, fault="kill_in_save:2")
    assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr
    faults += 1
    kill_points.append("inside the first save")
    assert ckpt_steps(out, "last") == [] and tmp_dirs(out) == [f"checkpoints/last/2{TMP_SUFFIX}"]
    assert not (out / "last.safetensors").exists()

    # 1. Resume (from scratch); SIGKILL inside the Orbax save of the 'best' checkpoint at step 6:
    #    every file written to the temporary directory, the commit (rename) not done. 'last' at 4
    #    stays the latest.
    r = dba_train(*first, "--resume", fault="kill_in_save:6")  # the same command, with --resume
    assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr
    assert "holds no checkpoint; starting a new run there" in r.stdout
    faults += 1
    resumes += 1
    kill_points.append("inside an Orbax save, before its commit")
    assert legs(out)[-1][0]["resumed_from"] is None
    assert ckpt_steps(out, "last") == [4] and ckpt_steps(out, "best") == []
    assert tmp_dirs(out) == [f"checkpoints/best/6{TMP_SUFFIX}"]
    assert any((out / "checkpoints" / "best" / f"6{TMP_SUFFIX}" / "state").rglob("*"))  # written, not committed
    assert [e["step"] for e in legs(out)[-1] if e["event"] == "train"] == list(range(1, 7))  # flushed per event
    assert export_step(out / "last.safetensors") == 4

    # 2. Resume from 4; SIGKILL right after 'best' at 6 committed, before 'last' at 6 was written.
    r = dba_train(*resume, fault="kill_after_save:6")
    assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr
    faults += 1
    resumes += 1
    kill_points.append("after a commit, before the next checkpoint")
    assert legs(out)[-1][0]["resumed_from"] == 4
    assert ckpt_steps(out, "last") == [4] and ckpt_steps(out, "best") == [6] and tmp_dirs(out) == []

    # 3. Resume from 4 (reaching 6 again re-saves 'best' 6); the disk fills while saving 'last' at
    #    8: a one-line error, exit 1, and 'last' 6 stays the latest and loadable.
    r = dba_train(*resume, fault="enospc_in_save:8")
    err = one_line_error(r, 1, prefix="dba train: error: ")
    assert "'last' checkpoint of step 8" in err and "disk is full" in err and "(step 6) is kept" in err, err
    faults += 1
    resumes += 1
    assert legs(out)[-1][0]["resumed_from"] == 4
    done = legs(out)[-1][-1]
    assert done["event"] == "done" and done["reason"] == "error" and "disk is full" in done["error"]
    assert ckpt_steps(out, "last") == [6] and ckpt_steps(out, "best") == [6]
    assert tmp_dirs(out) == [f"checkpoints/last/8{TMP_SUFFIX}"]

    # 4. Resume from 6; the loss of step 8 is NaN: the run stops there without saving (exit 1, one
    #    line naming the step), records the `nonfinite` event; 'last' 6 stays the latest.
    r = dba_train(*resume, fault="nan_loss_at:8")
    err = one_line_error(r, 1, prefix="dba train: error: ")
    assert "non-finite loss at step 8" in err and "checkpoint (step 6) is kept" in err, err
    faults += 1
    resumes += 1
    poisoned.add((len(legs(out)) - 1, 8))
    leg = legs(out)[-1]
    assert leg[0]["resumed_from"] == 6
    assert [(e["step"], e["quantity"], e["action"]) for e in leg if e["event"] == "nonfinite"] == [(8, "loss", "stop")]
    assert leg[-1]["event"] == "done" and leg[-1]["reason"] == "nonfinite" and leg[-1]["step"] == 8
    assert ckpt_steps(out, "last") == [6] and tmp_dirs(out) == []  # the leftover of fault 3 is cleaned up
    assert export_step(out / "last.safetensors") == 6

    # 5. Resume from 6; killed from outside (SIGKILL) while paused after step 9.
    code, text = signal_when_paused(resume, "pause_at_step:9", signal.SIGKILL)
    assert code == -signal.SIGKILL, text
    faults += 1
    resumes += 1
    kill_points.append("from outside, between steps")
    assert legs(out)[-1][0]["resumed_from"] == 6 and ckpt_steps(out, "last") == [8]

    # 6. Resume from 8; SIGTERM while paused after step 11: it saves step 11 and stops (143).
    code, text = signal_when_paused(resume, "pause_at_step:11", signal.SIGTERM)
    assert code == 143, text
    faults += 1
    resumes += 1
    leg = legs(out)[-1]
    assert leg[0]["resumed_from"] == 8
    assert leg[-1]["event"] == "done" and leg[-1]["reason"] == "sigterm" and leg[-1]["step"] == 11
    assert ckpt_steps(out, "last") == [11] and export_step(out / "last.safetensors") == 11

    # 7. Resume from 11 to the end.
    r = dba_train(*resume)
    assert r.returncode == 0, r.stdout + r.stderr
    resumes += 1
    all_legs = legs(out)
    assert all_legs[-1][0]["resumed_from"] == 11 and all_legs[-1][-1]["reason"] == "complete"
    assert len(all_legs) == 8

    # Every train and eval event of every leg equals the straight run's at that step, exactly.
    seen_steps = set()
    for i, leg in enumerate(all_legs):
        for e in leg:
            if e["event"] == "train":
                want = ref_train[e["step"]]
                assert e["grad_norm_total"] == want["grad_norm_total"], e["step"]
                if (i, e["step"]) in poisoned:
                    assert e["loss"] is None
                else:
                    assert e["loss"] == want["loss"], (e["step"], e["loss"], want["loss"])
                seen_steps.add(e["step"])
            elif e["event"] == "eval":
                assert e["val_loss"] == ref_evals[e["step"]]["val_loss"], e["step"]
    assert seen_steps == set(range(1, STEPS + 1))

    # The final parameters equal the straight run's, bit for bit (the weights export of 'last').
    from safetensors.numpy import load_file

    got, want = load_file(out / "last.safetensors"), load_file(ref / "last.safetensors")
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert ckpt_steps(out, "last") == ckpt_steps(ref, "last") == [STEPS]
    assert ckpt_steps(out, "best") == ckpt_steps(ref, "best") and tmp_dirs(out) == []
    print(f"\nfaults injected: {faults} (SIGKILL at {len(kill_points)} points: {'; '.join(kill_points)}; "
          f"ENOSPC in a save; NaN loss; SIGTERM); resumes verified: {resumes}")
    assert (faults, len(kill_points), resumes) == (7, 4, 7)


# ---- --skip-nonfinite ----------------------------------------------------------------------

def test_skip_nonfinite_skips_counts_and_stops(straight, data, tmp_path):
    ref, ref_train, _ = straight
    out = tmp_path / "skip"
    fault = "nan_grad_at:3,nan_loss_at:5"
    # The run syncs every 4 steps (log) and saves every 2: step 3 is skipped (1 allowed), step 5
    # is one too many. It is noticed at the save of step 6, which is therefore not written.
    args = ["--data", data, "--steps", STEPS, *TINY, "--log-every", 4, "--skip-nonfinite", 1, "--out-dir", out]
    err = one_line_error(dba_train(*args, fault=fault), 1, prefix="dba train: error: ")
    assert "non-finite loss at step 5" in err and "--skip-nonfinite allows 1" in err and "(step 4) is kept" in err, err
    ev = read_events(out / "train.jsonl")
    assert [(e["step"], e["quantity"], e["count"], e["action"]) for e in ev if e["event"] == "nonfinite"] == [
        (3, "grad_norm", 1, "skipped"), (5, "loss", 2, "stop")]
    train = [e for e in ev if e["event"] == "train"]
    assert [(e["step"], e["skipped_nonfinite"]) for e in train] == [(4, 1)]
    assert train[0]["loss"] != ref_train[4]["loss"]  # step 3's update was not applied
    done = ev[-1]
    assert done["event"] == "done" and done["reason"] == "nonfinite" and done["step"] == 6
    assert done["skipped_nonfinite"] == 2
    assert ckpt_steps(out, "last") == [4] and export_step(out / "last.safetensors") == 4
    from train.orbax_checkpoints import RunCheckpoints

    ck = RunCheckpoints(out)
    assert ck.read_meta("last")["skipped_nonfinite"] == 1
    ck.close()

    # Resumed with room for two: the count carries over (1), step 5 is skipped again, the run ends.
    r = dba_train("--out-dir", out, "--resume", "--steps", STEPS, "--skip-nonfinite", 2, fault=fault)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "step 5: non-finite loss; the update was skipped (2 of 2 allowed" in r.stdout
    ev = read_events(out / "train.jsonl")
    meta = [e for e in ev if e["event"] == "meta"][-1]
    assert meta["resumed_from"] == 4 and meta["flags"]["skip_nonfinite"] == 2
    assert [(e["step"], e["action"]) for e in ev if e["event"] == "nonfinite"][-1] == (5, "skipped")
    assert ev[-1]["reason"] == "complete" and ev[-1]["skipped_nonfinite"] == 2
    assert [e["skipped_nonfinite"] for e in ev if e["event"] == "train"][-1] == 2


def test_nonfinite_step_applies_nothing(monkeypatch):
    """In the jitted step: a step with a NaN gradient or a NaN loss leaves parameters and optimizer
    state exactly as they were and is counted; the steps around it update normally."""
    import jax

    from train.step import NONFINITE_GRAD, NONFINITE_LOSS

    monkeypatch.setenv("DBA_FAULT", "nan_grad_at:2,nan_loss_at:3")
    s = _stepper()
    rng = np.random.default_rng(0)
    w = rng.integers(0, 97, (1, 2, 17)).astype(np.int32)
    x, y = w[..., :-1], w[..., 1:]
    state = lambda: jax.device_get((s.params, s.opt_state))  # noqa: E731
    before = state()
    for i, bad in ((0, False), (1, True), (2, True), (3, False)):  # steps 1..4 (1-based)
        prev = before
        m = jax.device_get(s.train_step(x, y, i))
        before = state()
        same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(prev), jax.tree.leaves(before)))
        assert same == bad, i
        assert np.isfinite(m["grad_norm"]) != (i == 1) and np.isfinite(m["loss"]) != (i == 2)
        assert all(np.isfinite(a).all() for a in jax.tree.leaves(before[0]))
    assert int(m["nonfinite_count"]) == 2
    assert s.nonfinite_record() == (2, [(2, NONFINITE_GRAD), (3, NONFINITE_LOSS)])
    assert s.trace_count == 1


def _stepper():
    from flax import nnx

    import jax_model
    from dba.config import ModelConfig
    from train.config import OptimConfig
    from train.optim import build_optimizer
    from train.step import Stepper

    cfg = ModelConfig(vocab_size=97, block_size=16, n_layer=1, n_head=2, d_model=32, d_ff=64, embed_dim=32,
                      attn_mode="decoupled", attn_dim=32, sem_dim=8, geo_dim=16)
    return Stepper(jax_model.DBAModel(cfg, rngs=nnx.Rngs(0)),
                   build_optimizer(OptimConfig(lr=1e-2, weight_decay=0.1), 10), seed=0)


# ---- resource limits -------------------------------------------------------------------

def test_step_too_large_for_device_fails_at_compile(monkeypatch):
    import jax

    import train.step as step_mod
    from dba.errors import UserError
    from dba.units import human_bytes

    s = _stepper()
    monkeypatch.setattr(step_mod, "device_memory_limit", lambda device: 64 * 2**10)
    spec = jax.ShapeDtypeStruct((1, 2, 16), np.int32)
    with pytest.raises(UserError) as ei:
        s.compile_for(spec, spec)
    msg = str(ei.value)
    need = s.memory_bytes[(1, 2, 16)]
    assert ei.value.code == 1 and "\n" not in msg
    assert need > 64 * 2**10 and human_bytes(need, "iec") in msg and "64.0 KiB" in msg, msg
    assert "compiled estimate" in msg and "--batch-size" in msg
    assert s.compiles == 0  # nothing to run
    monkeypatch.setattr(step_mod, "device_memory_limit", lambda device: need)  # just fits
    assert s.compile_for(spec, spec) > 0 and s.compiles == 1


def test_train_cli_refuses_oversized_step_before_the_run(monkeypatch, capsys, data, tmp_path):
    """Through the CLI: the longest sequence length of the curriculum is compiled first, so the
    run fails before its first step, with one line, and leaves no run behind to --overwrite."""
    import train.step as step_mod
    from cli.main import main

    # room for the length-16 step (~0.3 MiB), not for the length-32 one the run reaches at step 6
    monkeypatch.setattr(step_mod, "device_memory_limit", lambda device: 400 * 2**10)
    monkeypatch.setattr(step_mod, "tune_host_malloc", lambda: False)  # keep pytest's allocator as is
    out = tmp_path / "big"
    code = main(["train", "--data", str(data), "--steps", "8", *map(str, TINY), "--seq-schedule", "16@0,32@6",
                 "--out-dir", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    assert err.startswith("dba train: error: the train step for batch 2 x seq 32 x accum 1 needs ~"), err
    assert "400.0 KiB" in err and "compiled estimate" in err
    from dba.run_dir import holds_run

    assert not holds_run(out)


def test_event_log_reads_v29_and_old_dba_records(tmp_path):
    """dba writes v29's "type" key; runs written with the old "event" key still load, and every
    record read carries its kind under both keys."""
    from dba.runlog import JsonlLog

    path = tmp_path / "train.jsonl"
    path.write_text('{"event": "meta", "config": {}}\n{"event": "eval", "step": 0, "val_loss": 5.5}\n[1, 2]\n')
    log = JsonlLog(path)
    returned = log.write("eval", step=4, val_loss=4.0)
    log.close()
    assert returned["type"] == returned["event"] == "eval"
    assert json.loads(path.read_text().splitlines()[-1])["type"] == "eval"
    assert "event" not in json.loads(path.read_text().splitlines()[-1])
    evals = read_events(path, "eval")
    assert [(e["step"], e["type"], e["event"]) for e in evals] == [(0, "eval", "eval"), (4, "eval", "eval")]
    assert [e["type"] for e in read_events(path)] == ["meta", "eval", "eval"]


def test_jsonl_log_survives_a_torn_line(tmp_path):
    """A run killed mid-line leaves a torn last line: the next writer ends it first."""
    from dba.runlog import JsonlLog

    path = tmp_path / "train.jsonl"
    path.write_text('{"event": "meta"}\n{"event": "train", "st')
    log = JsonlLog(path)
    log.write("meta", resumed_from=4)
    log.close()
    assert [e["event"] for e in read_events(path)] == ["meta", "meta"]
    assert read_events(path)[-1]["resumed_from"] == 4
