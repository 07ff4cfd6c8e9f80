"""`dba train --backend torch` end to end (torch_train/backend.py with train/run.py): the seed's flags on a toy train the
same model as the JAX trainer (same seed, same batches: losses within 1e-4), write the same run
directory (v29 records, summary, analysis, exports, a resumable torch state), resume exactly,
save on SIGTERM, and the result samples with either framework. The step itself is compared with
the JAX step in parity_tests/test_torch_train_parity.py.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from tests.support import ENV, REPO, SEED_FLAGS, dba_train, losses, ok
from tests.support import one_line_error as _one_line_error

pytestmark = pytest.mark.slow  # `dba train --backend torch` end to end, in subprocesses

pytest.importorskip("torch")

STEPS = 8


@pytest.fixture(scope="module")
def both_runs(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("torch_runs")
    runs = {}
    for backend in ("torch", "jax"):
        out = root / backend
        r = ok(dba_train("--data", data, "--steps", STEPS, *SEED_FLAGS, "--backend", backend, "--live", "basic",
                         "--out-dir", out))
        runs[backend] = (out, r)
    return runs


def test_torch_and_jax_train_the_same_model(both_runs):
    """Same seed and data: the torch run starts from the JAX trainer's weights and draws the same
    batches, so every step's loss and every evaluation agree within 5e-6 (fp32, CPU; measured
    9.5e-7 and 4.8e-7), far below what one step moves the loss (>= 6.5e-4 here): a wrong lr,
    decay, batch or optimizer would show."""
    (t_out, _), (j_out, _) = both_runs["torch"], both_runs["jax"]
    t, j = losses(t_out), losses(j_out)
    assert sorted(t) == sorted(j) == list(range(1, STEPS + 1))
    gap = max(abs(t[s] - j[s]) for s in t)
    te, je = losses(t_out, "eval", "val_loss"), losses(j_out, "eval", "val_loss")
    eval_gap = max(abs(te[s] - je[s]) for s in te)
    tn, jn = losses(t_out, "train", "grad_norm_total"), losses(j_out, "train", "grad_norm_total")
    norm_gap = max(abs(tn[s] - jn[s]) / jn[s] for s in tn)
    ta, ja = (losses(o, "analysis", "attn_entropy_mean") for o in (t_out, j_out))
    print(f"\ntorch vs JAX: loss {gap:.2e}, eval {eval_gap:.2e}, grad norm rel {norm_gap:.2e}, "
          f"entropy {max(abs(ta[s] - ja[s]) for s in ta):.2e}; one step moves the loss by "
          f"{min(abs(j[s + 1] - j[s]) for s in range(1, STEPS)):.2e} at least")
    assert gap < 5e-6, gap
    assert sorted(te) == sorted(je) == [0, 4, 8] and eval_gap < 5e-6
    assert norm_gap < 1e-5  # measured 1.6e-7
    assert sorted(ta) == sorted(ja) and max(abs(ta[s] - ja[s]) for s in ta) < 1e-5  # measured 7e-7


def test_torch_run_directory(both_runs):
    out, r = both_runs["torch"]
    lines = r.stdout.splitlines()
    assert lines[0] == f"dba train: run dir {out}" and "torch" in lines[2] and "on cpu" in lines[2]
    raw = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    kinds = [rec["type"] for rec in raw]
    assert kinds[0] == "meta" and kinds[-1] == "done" and {"train", "eval", "analysis"} <= set(kinds)
    meta, done = raw[0], raw[-1]
    assert meta["backend"] == "torch" and meta["env"]["torch"] and meta["args"]["optimizer"] == "lion"
    assert meta["config"]["block_size"] == 32 and meta["context"]["grown"]  # the curriculum grew the context
    assert done["reason"] == "complete" and done["step"] == STEPS and done["lengths"] == [16, 32]
    for name in ("summary.md", "analysis.png", "analysis.h5", "best.safetensors", "last.safetensors",
                 "checkpoints/last/torch_state.pt", "checkpoints/best/torch_state.pt"):
        assert (out / name).is_file(), name
    summary = (out / "summary.md").read_text()
    assert "- Device: `torch" in summary and "## KV Cache Memory (batch=1)" in summary


def test_trained_with_torch_samples_with_jax_and_torch(both_runs):
    out, _ = both_runs["torch"]
    texts = []
    for backend in ("jax", "torch"):
        r = subprocess.run([sys.executable, "-m", "cli", "sample", "--ckpt", str(out), "--backend", backend,
                            "--prompt-tokens", "1,2,3", "--max-new-tokens", "6", "--temperature", "0"],
                           cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        texts.append(r.stdout.strip())
    assert texts[0] == texts[1] and len(texts[0].split(",")) == 9  # greedy: the same ids either way


def test_torch_resume_equals_a_straight_run(both_runs, data, tmp_path):
    """Resumed without --backend (SEED_FLAGS' --device cpu alone would pick JAX), a torch run stays
    torch, says so in its first line, and ends bit for bit where a straight run does, its 'best'
    checkpoint unreadable (a warning; a new best at the next eval); asking for the other
    framework's training state is one line."""
    straight, _ = both_runs["torch"]
    out = tmp_path / "legs"
    common = ["--data", data, *SEED_FLAGS, "--live", "off", "--out-dir", out]
    ok(dba_train(*common, "--backend", "torch", "--steps", 3))
    r = dba_train(*common, "--backend", "jax", "--steps", STEPS, "--resume")
    assert "trained with torch" in _one_line_error(r, 2)
    best = out / "checkpoints" / "best" / "torch_state.pt"
    best.write_bytes(best.read_bytes()[:100])  # an unreadable 'best': resuming needs only 'last'
    r = ok(dba_train(*common, "--steps", STEPS, "--resume"))
    first = r.stdout.splitlines()
    assert "resuming a run trained with torch" in first[0] and "steps 3->8" in r.stdout
    assert "warning: the 'best' checkpoint cannot be read" in r.stdout
    assert json.loads((best.parent / "meta.json").read_text())["step"] == STEPS  # the next eval wrote a new one
    assert losses(out) == losses(straight)  # bit for bit on the CPU: same state, same batches


def test_sigterm_saves_the_torch_state(data, tmp_path):
    out = tmp_path / "stopped"
    p = subprocess.Popen([sys.executable, "-m", "cli", "train", "--data", str(data), *map(str, SEED_FLAGS),
                          "--backend", "torch", "--steps", "50", "--live", "basic", "--out-dir", str(out)],
                         cwd=REPO, env=dict(ENV, DBA_FAULT="pause_at_step:3"), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, bufsize=1)
    for line in p.stdout:
        if line.startswith("DBA_FAULT: paused at step"):
            break
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=300)
    assert p.returncode == 143
    meta = json.loads((out / "checkpoints" / "last" / "meta.json").read_text())
    assert meta["step"] == 3
    done = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()][-1]
    assert done["type"] == "done" and done["reason"] == "sigterm" and done["step"] == 3


@pytest.mark.parametrize("args,needle", [
    (["--backend", "torch", "--mesh", "data=2"], "--mesh is for the JAX trainer"),
    (["--backend", "torch", "--device", "tpu"], "train on TPUs with --backend jax"),
    (["--backend", "jax", "--device", "cuda:1"], "CUDA_VISIBLE_DEVICES"),
    (["--device", "cuda:0"], "PyTorch sees no CUDA device"),
])
def test_torch_flag_mistakes_are_one_line(args, needle, data, tmp_path, capsys, monkeypatch):
    """In process (the CLI's own error path; these stop before any framework starts)."""
    from cli.main import main

    monkeypatch.setenv("DBA_NO_MALLOC_TUNING", "1")
    code = main(["train", "--data", str(data), *args, "--steps", "1", "--out-dir", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == (1 if "no CUDA device" in needle else 2), err
    assert len(err.strip().splitlines()) == 1 and needle in err and "Traceback" not in err, err
    assert not (tmp_path / "x").exists()
