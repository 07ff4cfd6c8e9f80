"""The typed run configuration (train/config.py, train/args.py), the hooks (train/hooks.py) and the
`Run` (train/run.py), each piece called on its own, in process, on a toy model."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from dba.errors import UserError
from dba.kvspec import KVPolicy
from dba.runlog import read_events
from train.args import FLAGS, run_config
from train.hooks import Hook, Hooks

TOY = {"d_model": 24, "layers": 1, "n_head": 2, "d_ff": 40, "sem_dim": 8, "geo_dim": 8, "attn_dim": 16,
       "vocab_size": 97, "batch_size": 2, "train_seq_len": 16, "eval_iters": 1, "log_every": 1, "live": "off",
       "device": "cpu", "data_format": "npy"}


# ---- the typed configuration ------------------------------------------------------------------

def test_every_flag_lands_in_one_typed_field_and_back():
    c = run_config({"lr": 1e-3, "kv_cache": "q4_0", "kv_qblock_k_geo": 16, "compile": True, "eval_every": 7,
                    "data": "x.npy", "optimizer": "lion", "mesh": "data=1"})
    assert (c.optim.lr, c.optim.name, c.eval.every, c.data.path, c.distributed.mesh) == (1e-3, "lion", 7, "x.npy", "data=1")
    assert c.kv == KVPolicy(kind="q4_0", qblock_k_geo=16) and c.recorded["compile"] is True
    assert c.optim.betas == (0.9, 0.99)  # Lion's, not AdamW's
    flags = c.to_flags()
    assert set(flags) == {f.name for f in FLAGS}
    again = run_config({}, base=flags)
    for group in ("run", "data", "model", "steps", "optim", "precision", "eval", "analysis", "ckpt", "distributed",
                  "display", "kv", "recorded"):
        assert getattr(again, group) == getattr(c, group), group
    assert c.noop_flags() == {"compile": True} and again.noop_flags() == {}


def test_config_groups_are_frozen():
    c = run_config({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.optim.lr = 1.0


@pytest.mark.parametrize("flags,needle", [
    ({"steps": 0}, "--steps"), ({"eval_every": -1}, "--eval-every"), ({"lion_betas": "0.9"}, "--lion-betas"),
    ({"val_frac": 1.5}, "--val-frac"), ({"analysis_topk": 0}, "--analysis-topk"), ({"log_every": 0}, "--log-every"),
    ({"kv_qblock": -2}, "-2"), ({"seq_schedule": "8@0,4@0"}, "4@0"), ({"lr_schedule": "cosine", "warmup_steps": 700}, "700"),
    ({"rope": True, "no_rope": True}, "--no-rope"), ({"mesh": "data=3", "batch_size": 4}, "data=3"),
])
def test_bad_values_are_one_line_naming_the_flag(flags, needle):
    with pytest.raises(UserError) as e:
        run_config(flags)
    assert needle in str(e.value) and "\n" not in str(e.value) and e.value.code == 2


def test_ckpt_model_clash_names_the_field():
    from dba.config import ModelConfig

    ckpt = ModelConfig(vocab_size=97, block_size=16, n_layer=1, n_head=2, d_model=24, d_ff=40, embed_dim=24,
                       attn_mode="decoupled", sem_dim=8, geo_dim=8, attn_dim=16)
    c = run_config({"d_model": 32})
    with pytest.raises(UserError, match="d_model=24"):
        c.resolve_model(97, ckpt)
    cfg, context = run_config({"block": 8, "train_seq_len": 32}).resolve_model(97, ckpt)
    assert cfg.d_model == 24 and cfg.block_size == 32 and context["grown"]


# ---- hooks ------------------------------------------------------------------------------------

def test_hook_due_steps():
    calls = []
    hooks = Hooks()
    hooks.add(Hook("every3", 3, calls.append))
    hooks.add(Hook("never_at_end", 3, calls.append, at_end=False))
    hooks.add(Hook("on_stop", 0, calls.append, at_end=False, on_stop=True))
    due = {s: [h.name for h in hooks.due(s, 7, stopping=False)] for s in range(1, 8)}
    assert due == {1: [], 2: [], 3: ["every3", "never_at_end"], 4: [], 5: [], 6: ["every3", "never_at_end"],
                   7: ["every3"]}
    assert [h.name for h in hooks.due(4, 7, stopping=True)] == ["on_stop"]
    with pytest.raises(ValueError):
        hooks.add(Hook("every3", 1, calls.append))


# ---- the Run, piece by piece --------------------------------------------------------------------

@pytest.fixture(scope="module")
def started(data, tmp_path_factory):
    from train.jax_backend import JaxBackend
    from train.run import Run, RunPlan

    out = tmp_path_factory.mktemp("run") / "toy"
    config = run_config({**TOY, "data": str(data), "steps": 5, "eval_every": 0, "instrument": "basic",
                         "analysis_every": 2, "save_every": 2})
    run = Run(RunPlan(config), JaxBackend(config), out_dir=out, name="toy", argv=["--steps", "5"])
    run.start()
    return run


def test_run_plans_without_a_device_or_a_directory(data, tmp_path):
    from train.run import RunPlan

    plan = RunPlan(run_config({**TOY, "data": str(data), "steps": 3, "train_seq_len": 24}))
    assert plan.cfg.d_model == 24 and plan.cfg.block_size == 24 and plan.data.vocab_size == 97
    assert plan.analysis_spec is None and plan.context["longest_train_len"] == 24
    assert not any(tmp_path.iterdir())
    with pytest.raises(UserError, match="n_head=5"):
        RunPlan(run_config({**TOY, "data": str(data), "n_head": 5}))


def test_run_methods_alone(started):
    run = started
    run.open_log()
    rec = run.evaluate(0)
    assert rec["step"] == 0 and math.isfinite(rec["val_loss"]) and rec["best_val"] is None  # step 0 is no best
    a = run.analyse(0)
    assert a["step"] == 0 and 0.0 <= a["attn_topk_mass_mean"] <= 1.0 + 1e-6
    assert run.check_nonfinite(0) is None
    run.save("last", 0)
    assert run.ckpts.latest_step("last") == 0 and (run.out / "last.safetensors").is_file()
    events = [e["event"] for e in read_events(run.out / "train.jsonl")]
    assert events == ["meta", "eval", "analysis"]


def test_hooks_drive_fit(started):
    run = started
    seen = []
    run.add_hook("probe", 2, seen.append, reads_state=False, syncs=False)
    assert run.fit() == 0
    assert seen == [2, 4, 5]
    ev = read_events(run.out / "train.jsonl")
    assert [e["step"] for e in ev if e["event"] == "train"] == [1, 2, 3, 4, 5]
    assert [e["step"] for e in ev if e["event"] == "analysis"] == [0, 0, 2, 4, 5]  # two at 0: the test's own
    assert [e["step"] for e in ev if e["event"] == "eval"] == [0, 5]  # --eval-every 0: only at the end
    assert run.progress.saved_last_at == 5 and run.ckpts.root.is_dir()
    assert np.isfinite(run.progress.best_val) and ev[-1]["event"] == "done" and ev[-1]["reason"] == "complete"


@pytest.mark.slow
def test_loop_flags_reach_the_loop(data, tmp_path):
    """What the loop's flags do (tests/test_v29_flags.py points here): --eval-iters batches per
    evaluation, --eval-seq-len its length, --log-every the steps with a train event,
    --live-update-every the display's interval, --live-plot a redraw of analysis.png at log steps
    (without it the plot waits for an evaluation), --val-frac the held-out share."""
    from train.jax_backend import JaxBackend
    from train.run import Run, RunPlan

    def started(**flags):
        config = run_config({**TOY, "data": str(data), "steps": 5, "eval_every": 0, **flags})
        run = Run(RunPlan(config), JaxBackend(config), out_dir=tmp_path / str(len(list(tmp_path.iterdir()))),
                  name="toy", argv=[])
        run.start()
        return run

    run = started(eval_iters=3, eval_seq_len=20, log_every=2, live_update_every=3, live_plot=True, val_frac=0.25)
    xv, yv, xt, yt = run._eval_batches(20)
    assert xv.shape == yv.shape == xt.shape == yt.shape == (3, 2, 20)  # iters x batch x length
    total = len(run.plan.data.train) + len(run.plan.data.val)
    assert abs(len(run.plan.data.val) - 0.25 * total) <= 1
    assert {h.name: h.every for h in run.hooks.hooks}["display"] == 3
    plot_at_log = []
    run.add_hook("probe", 2, lambda step: plot_at_log.append((run.out / "analysis.png").exists()),
                 reads_state=False, syncs=False, at_end=False)
    assert run.fit() == 0
    ev = read_events(run.out / "train.jsonl")
    assert [e["step"] for e in ev if e["event"] == "train"] == [2, 4, 5]  # and the last step
    assert [e["seq_len"] for e in ev if e["event"] == "eval"] == [20]
    assert plot_at_log == [True, True]  # drawn at the log steps, before any evaluation
    quiet = started(log_every=2)  # no --live-plot: nothing drawn before the final evaluation
    seen = []
    quiet.add_hook("probe", 2, lambda step: seen.append((quiet.out / "analysis.png").exists()),
                   reads_state=False, syncs=False, at_end=False)
    assert quiet.fit() == 0 and seen == [False, False] and (quiet.out / "analysis.png").exists()


# ---- the first line's precision note on a CPU with bf16 matrix units ----------------------------

def test_cpu_precision_note_names_the_faster_precision(monkeypatch):
    """Said only where there are bf16 matrix units and the run is on a CPU: JAX keeps fp32 (XLA:CPU
    has no bf16 matrix path), torch names --amp when its bf16 matmul measured faster here."""
    import cli.train as ctrain
    from dba import resources
    from torch_train import precision
    from train.config import RunSettings

    monkeypatch.setattr(precision, "bf16_speedup", lambda: 4.4)
    monkeypatch.setattr(precision, "runs_on_cpu", lambda device: device in ("auto", "cpu"))
    monkeypatch.setattr(resources, "bf16_matrix_units", lambda: None)
    assert ctrain.cpu_precision_note(RunSettings(device="cpu"), "torch") is None
    monkeypatch.setattr(resources, "bf16_matrix_units", lambda: "amx_bf16")
    monkeypatch.setattr(ctrain.os.path, "exists", lambda p: False)  # no NVIDIA device node
    jax_note = ctrain.cpu_precision_note(RunSettings(), "jax")
    assert "(amx_bf16), which XLA:CPU does not use: fp32" in jax_note and "--backend torch --amp" in jax_note
    torch_note = ctrain.cpu_precision_note(RunSettings(device="cpu", backend="torch"), "torch")
    assert "a bf16 matmul ran 4.4x fp32's here, so --amp" in torch_note
    assert ctrain.cpu_precision_note(RunSettings(device="cuda", backend="torch"), "torch") is None
    monkeypatch.setattr(precision, "bf16_speedup", lambda: 1.1)
    assert "ran only 1.1x fp32's here: fp32" in ctrain.cpu_precision_note(RunSettings(device="cpu"), "torch")
