"""No v29 flag means something else (docs/v29_flags.md).

Every flag of the seed run's summary (its "Training Args", copied in tests/v29_seed_args.json) goes
through `dba train --print-config`, in process, with a value other than the default: the printed
model/args (and the typed RunConfig behind them) must show it honoured as v29 did, or the command
must exit non-zero with a one-line message saying what dba does instead. Flags that `dba sample`
uses (prompt, temperature, KV-cache policy, self-opt) also go through its parser. The table must
name every key of the summary, so a flag added there cannot be missed.

Then part 4 of the issue: token-id runs that record a tokenizer, and `dba sample --prompt TEXT`
printing text (or saying in one line that the tokenizer cannot be had and falling back to ids).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dba.errors import UserError

REPO = Path(__file__).resolve().parents[1]
SEED_ARGS: dict[str, Any] = json.loads(Path(__file__).with_name("v29_seed_args.json").read_text())
# The seed run's summary: the repository's copy, and the shared original beside it when present.
SUMMARIES = [p for p in (REPO / "tests" / "fixtures" / "seed" / "run_summary.md",
                         REPO.parent / "shared" / "seed" / "run_summary.md") if p.exists()]


@dataclass
class Case:
    """One invocation: `argv` after `dba train --print-config --data <base ids>`; then either
    `check(out, config)` (out: the printed JSON; config: the RunConfig of the same flags) or
    `refused` (a needle of the one-line error); `sample`: (argv of `dba sample`, {dest: value}).
    A check asserts, or returns a bool (False fails)."""

    argv: list[str]
    check: Callable[[Any, Any], None] | None = None
    refused: str | None = None
    sample: tuple[list[str], dict[str, Any]] | None = None
    files: list[str] = field(default_factory=list)  # fixture files this case needs (skip if absent)
    # where a check only sees the flag land in the configuration, the test that shows what that
    # setting does ("path::test_name"); test_every_flag_has_its_effect_tested holds the table to it
    effect: str | None = None


def args_are(**want) -> Callable:
    """An echo: the flag's value comes back in the printed configuration (no effect shown)."""
    def check(out, _config):
        for k, v in want.items():
            assert out["args"][k] == v, (k, out["args"][k], v)
    check.echo = True
    return check


def config_is(**want) -> Callable:
    """The flag lands in the RunConfig field the run reads ('group.field'): still no effect by
    itself, so a case with it names the test that shows the effect."""
    def check(_out, config):
        for path, v in want.items():
            group, attr = path.split(".")
            assert getattr(getattr(config, group), attr) == v, (path, getattr(getattr(config, group), attr), v)
    check.echo = True
    return check


def model_is(**want) -> Callable:
    def check(out, _config):
        for k, v in want.items():
            assert out["model"][k] == v, (k, out["model"][k], v)
    return check


def both(*checks) -> Callable:
    def check(out, config):
        for c in checks:
            assert c(out, config) is not False, c
    check.echo = all(getattr(c, "echo", False) for c in checks)
    return check


def analysis_is(**want) -> Callable:
    """The analysis the run will run (dba.analysis_spec.spec_for: what Run hands the analysis pass)."""
    def check(out, config):
        from dba.analysis_spec import spec_for
        from dba.config import ModelConfig

        spec = spec_for(config.analysis, config.eval.every, ModelConfig.from_dict(out["model"]))
        for k, v in want.items():
            assert getattr(spec, k) == v, (k, getattr(spec, k), v)
    return check


def _adam_eps(_out, config):
    """One AdamW update of the chain the run builds, from zero moments with a unit gradient:
    -lr * g / (|g| + eps), so eps = 0.5 moves p by -1/1.5."""
    import dataclasses

    import jax.numpy as jnp

    from train.optim import build_optimizer

    tx = build_optimizer(dataclasses.replace(config.optim, lr=1.0, weight_decay=0.0, grad_clip=0.0), 10)
    p = {"w": jnp.zeros(3)}
    u, _ = tx.update({"w": jnp.ones(3)}, tx.init(p), p)
    np.testing.assert_allclose(np.asarray(u["w"]), -1.0 / (1.0 + config.optim.adam_eps), rtol=1e-6)


def _schedule_is(**at) -> Callable:
    """The learning rate the run's schedule gives after k updates ({k: lr}), and the optimizer the
    chain is (Lion's state is optax's ScaleByLionState)."""
    def check(_out, config):
        sched = config.optim.schedule(config.steps.steps)
        for k, lr in at.items():
            assert abs(sched(int(k[1:])) - lr) <= 1e-12 + 1e-6 * lr, (k, sched(int(k[1:])), lr)
    return check


def _optimizer_is(kind: str) -> Callable:
    def check(_out, config):
        import jax
        import jax.numpy as jnp
        import optax

        from train.optim import build_optimizer

        state = build_optimizer(config.optim, config.steps.steps).init({"w": jnp.zeros(2)})
        states = {type(x).__name__ for x in jax.tree_util.tree_leaves(state, is_leaf=lambda x: isinstance(
            x, (optax.ScaleByLionState, optax.ScaleByAdamState)))}
        assert {"lion": "ScaleByLionState", "adamw": "ScaleByAdamState"}[kind] in states, states
    return check


def _matmul_precision(_out, config):
    """The JAX backend sets JAX's default matmul precision (and the torch one torch's)."""
    import jax
    import torch

    from torch_train.backend import TorchBackend
    from train.jax_backend import JaxBackend

    before_j, before_t = jax.config.jax_default_matmul_precision, torch.get_float32_matmul_precision()
    try:
        JaxBackend(config)
        assert jax.config.jax_default_matmul_precision == "highest"
        TorchBackend(config, "cpu")
        assert torch.get_float32_matmul_precision() == "highest"
    finally:
        jax.config.update("jax_default_matmul_precision", before_j)
        torch.set_float32_matmul_precision(before_t)


def _no_effect_recorded(flag: str) -> Callable:
    """v29 flags dba accepts and records as doing nothing here (docs/v29_flags.md says why): the
    run's meta lists them under noop_flags."""
    def check(_out, config):
        assert flag in config.noop_flags(), config.noop_flags()
    return check


def _val_frac(_out, config):
    from train.batches import RunData

    data = RunData.load(config.data)
    total = len(data.train) + len(data.val)
    assert abs(len(data.val) - config.data.val_frac * total) <= 1


def _seed_draws(_out, config):
    """The seed picks the initial weights and the batches (both frameworks draw them from it)."""
    from dba.config import ModelConfig
    from train.batches import RunData, train_batch
    from train.init_weights import initial_state

    cfg = ModelConfig.from_dict(_out["model"])
    tokens = RunData.load(config.data).train
    draws = {seed: train_batch(tokens, batch_size=2, grad_accum=1, seed=seed, seq_len=8, step=0)[0] for seed in (7, 1337)}
    assert config.run.seed == 7 and not np.array_equal(draws[7], draws[1337])
    w7, w1337 = initial_state(cfg, 7)[0], initial_state(cfg, 1337)[0]
    assert not np.array_equal(w7["tok_emb.weight"], w1337["tok_emb.weight"])


def recorded(key: str, value: Any, flag: str | None = None, effect: str | None = None) -> Case:
    """A v29 flag of sampling/decoding: `dba train` records it (v29 kept it in the args), and
    `dba sample` takes it under the same name; `effect`: the test that shows what it does there."""
    opt = flag or "--" + key.replace("_", "-")
    argv = [opt] if value is True else [opt, str(value)]
    return Case(argv, args_are(**{key: value}), sample=(argv, {key: value}), effect=effect)


def _analysis_off(out, config):
    from train.analysis import spec_for

    assert out["args"]["analysis_every"] == 0 and out["args"]["instrument"] == "basic"
    assert not config.analysis.enabled and spec_for(config.analysis, config.eval.every, None) is None


def _analysis_every(out, config):
    from dba.config import ModelConfig
    from train.analysis import spec_for

    cfg = ModelConfig.from_dict(out["model"])
    assert spec_for(config.analysis, config.eval.every, cfg).every == 7
    assert spec_for(config.analysis.__class__(instrument="basic"), 50, cfg).every == 50  # not given: every eval


def _size_small(out, config):
    a, m = out["args"], out["model"]
    assert (a["steps"], a["batch_size"], a["train_seq_len"]) == (10000, 8, 1024)  # v29's small preset
    assert (m["d_model"], m["n_layer"], m["n_head"], m["d_ff"], m["block_size"]) == (768, 12, 12, 3072, 1024)
    assert (m["sem_dim"], m["geo_dim"], m["attn_dim"]) == (48, 96, 144)


def _paper_all(out, _config):
    assert isinstance(out, list) and len(out) == 4
    assert [o["args"]["exp"] for o in out] == ["paper_baseline", "paper_bottleneck", "paper_decoupled", "paper_gqa"]
    assert [o["model"]["attn_mode"] for o in out] == ["standard", "bottleneck", "decoupled", "gqa"]
    assert [o["run_dir"] for o in out] == [os.path.join("runs", f"tiny_{e}_a")
                                          for e in ("baseline", "bottleneck", "decoupled", "gqa")]
    assert all(o["args"]["steps"] == 6000 and o["args"]["batch_size"] == 16 for o in out)


def _trains_with(backend: str, device: str) -> Callable:
    def check(out, _config):
        assert (out["backend"], out["device"]) == (backend, device), (out["backend"], out["device"])
    return check


def _run_dir(expected: str) -> Callable:
    def check(out, _config):
        assert out["run_dir"] == expected, out["run_dir"]
    return check


def _tokenizer_recorded(name: str, vocab: int) -> Callable:
    def check(out, config):
        from train.batches import RunData

        data = RunData.load(config.data)
        assert data.tokenizer is not None and data.tokenizer.to_dict()["name"] == name
        assert out["model"]["vocab_size"] == vocab
    return check


def _no_tokenizer(out, config):
    from train.batches import RunData

    assert out["args"]["tokenizer"] == "word" and RunData.load(config.data).tokenizer is None


def _self_opt_case(key: str, seed_value: Any) -> Case:
    """v29's self-optimising decode knobs: recorded by `dba train`, taken by `dba sample`."""
    special = {"self_opt": "startup", "self_opt_scope": "decode", "self_opt_cache": "plans.json",
               "self_opt_calib_tokens": "calib.npy", "self_opt_mem_budget_mb": 12.5,
               "self_opt_quality_kl_tol": 0.05, "self_opt_policy_prefix_len": 64}
    if key in special:
        value = special[key]
    elif isinstance(seed_value, bool):
        value = True
    elif isinstance(seed_value, int):
        value = seed_value + 1
    elif isinstance(seed_value, float):
        value = seed_value * 2
    else:  # comma lists of kinds/sizes
        value = {"self_opt_block_n": "64"}.get(key, ",".join(str(seed_value).split(",")[:2]))
    from dba.self_opt import SELF_OPT_V29_ONLY

    if key in {f.name for f in SELF_OPT_V29_ONLY}:  # v29 knobs with no effect here (their --help says why)
        case = recorded(key, value)
        return dataclasses.replace(case, check=both(case.check, _no_effect_recorded(key)))
    return recorded(key, value, effect="tests/test_self_opt.py::test_sample_with_self_opt")


def _kv(key: str, value: Any) -> Case:
    """The KV-cache policy flags: the summary's memory section in `dba train`, the cache in `dba sample`."""
    def check(out, config):
        from train.args import FLAG_FIELDS

        assert out["args"][key] == value and getattr(config.kv, FLAG_FIELDS[key][1]) == value
    check.echo = True
    opt = "--" + key.replace("_", "-")
    return Case([opt, str(value)], check, sample=([opt, str(value)], {key: value}),
                effect="tests/test_train.py::test_seed_flags_end_to_end_artifacts")  # summary.md's KV section


def table(files: dict[str, Path]) -> dict[str, list[Case]]:
    f = {k: str(v) for k, v in files.items()}
    t: dict[str, list[Case]] = {
        "adam_betas": [Case(["--adam-betas", "0.8,0.9"],
                            both(args_are(adam_betas="0.8,0.9"), lambda o, c: c.optim.betas == (0.8, 0.9))),
                       Case(["--adam-betas", "0.9"], refused="--adam-betas must be two numbers")],
        "adam_eps": [Case(["--adam-eps", "0.5"], _adam_eps)],
        "amp": [Case(["--amp"], both(args_are(amp=True), lambda o, c: c.precision.compute_dtype == "bf16"))],
        "amp_dtype": [Case(["--amp", "--amp-dtype", "fp16"],
                           lambda o, c: o["args"]["amp_dtype"] == "fp16" and c.precision.compute_dtype == "fp16")],
        # v29: 0 turns the analysis off (dba used to read 0 as "at every eval")
        "analysis_every": [Case(["--instrument", "basic", "--analysis-every", "0"], _analysis_off),
                           Case(["--instrument", "basic", "--analysis-every", "7"], _analysis_every),
                           Case(["--analysis-every", "-1"], refused="--analysis-every -1")],
        # what the analysis pass then computes with them: parity_tests/test_analysis_parity.py
        "analysis_heads": [Case(["--instrument", "basic", "--analysis-heads", "all"], analysis_is(heads=(0, 1, 2, 3)))],
        "analysis_layers": [Case(["--instrument", "basic", "--analysis-layers", "-1"], analysis_is(layers=(3,)))],
        "analysis_local_window": [Case(["--instrument", "basic", "--analysis-local-window", "16"],
                                       analysis_is(local_window=16))],
        "analysis_max_tokens": [Case(["--instrument", "basic", "--analysis-max-tokens", "64"], analysis_is(max_tokens=64))],
        "analysis_save_scores": [Case(["--instrument", "basic", "--analysis-save-scores"], analysis_is(save_scores=True))],
        "analysis_topk": [Case(["--instrument", "basic", "--analysis-topk", "4"], analysis_is(topk=4))],
        "attn_dim": [Case(["--attn-mode", "bottleneck", "--attn-dim", "64"], model_is(attn_mode="bottleneck", attn_dim=64))],
        "attn_mode": [Case(["--attn-mode", "gqa", "--kv-head", "2"], model_is(attn_mode="gqa", kv_head=2))],
        "batch_size": [Case(["--batch-size", "3"], config_is(**{"steps.batch_size": 3}),
                            effect="tests/test_train.py::test_seed_flags_end_to_end_artifacts")],
        "block": [Case(["--block", "512"], model_is(block_size=512))],
        "ckpt": [Case(["--ckpt", f["ckpt"]], model_is(d_model=24, n_layer=1, vocab_size=256))],
        # JAX always compiles the step; the PyTorch trainer wraps its step in torch.compile
        "compile": [Case(["--compile"], args_are(compile=True),
                         effect="tests/test_torch_trainer_parts.py::test_compile_failure_falls_back_to_eager")],
        "compile_mode": [Case(["--compile-mode", "max-autotune"], args_are(compile_mode="max-autotune"),
                              effect="tests/test_torch_trainer_parts.py::test_compile_failure_falls_back_to_eager")],
        "d_ff": [Case(["--d-ff", "300"], model_is(d_ff=300))],
        "d_model": [Case(["--d-model", "64"], model_is(d_model=64, d_ff=256, embed_dim=64))],
        "data": [Case(["--data", f["other"]], both(args_are(data=f["other"]), model_is(vocab_size=77)))],
        "data_dtype": [Case(["--data", f["bin"], "--data-dtype", "uint32"], model_is(vocab_size=1000))],
        # v29's text = whitespace-separated integer ids; text to tokenize is utf8 here
        "data_format": [
            Case(["--data", f["ids_txt"], "--data-format", "text"], model_is(vocab_size=500)),
            Case(["--data", f["ids_txt"]], model_is(vocab_size=500)),  # auto sniffs the ids
            Case(["--data", f["prose"], "--data-format", "text"], refused="is not an integer token id"),
            Case(["--data", f["prose"], "--data-format", "utf8"], model_is(vocab_size=256)),
            Case(["--data", f["prose"]], model_is(vocab_size=256)),
            Case(["--data", f.get("pt", ""), "--data-format", "pt"], model_is(vocab_size=400), files=["pt"]),
            Case(["--data", f["base"], "--data-format", "npy"], model_is(vocab_size=256)),
        ],
        # the framework follows the device (train/backends.py): mps and cuda:N train with PyTorch
        "device": [
            Case(["--device", "mps"], _trains_with("torch", "mps")),
            Case(["--device", "cuda:1"], _trains_with("torch", "cuda:1")),
            Case(["--device", "cpu"], _trains_with("jax", "cpu")),
            Case(["--backend", "torch", "--device", "cpu"], _trains_with("torch", "cpu")),
            Case(["--backend", "jax", "--device", "mps"], refused="JAX has no mps backend"),
            Case(["--device", "npu"], refused="--device 'npu'"),
        ],
        "mode": [Case(["--mode", "train"], args_are(mode="train")),
                 Case(["--mode", "sample"], refused="use `dba sample`")],
        "dropout": [Case(["--dropout", "0.1"], model_is(dropout=0.1))],
        "embed_dim": [Case(["--embed-dim", "64"], model_is(embed_dim=64))],
        "eval_every": [Case(["--eval-every", "50"], config_is(**{"eval.every": 50}),
                            effect="tests/test_train.py::test_seed_flags_end_to_end_artifacts")],
        "eval_iters": [Case(["--eval-iters", "3"], config_is(**{"eval.iters": 3}),
                            effect="tests/test_run.py::test_loop_flags_reach_the_loop")],
        "eval_seq_len": [Case(["--eval-seq-len", "64"],
                              both(config_is(**{"eval.seq_len": 64}), lambda o, c: o["model"]["block_size"] >= 64),
                              effect="tests/test_run.py::test_loop_flags_reach_the_loop")],
        "exp": [
            Case(["--exp", "paper_decoupled"],
                 both(model_is(attn_mode="decoupled", tie_qk=True, null_attn=True, rope=True), _run_dir("runs/decoupled"))),
            Case(["--exp", "train_decoupled_fast"], model_is(attn_mode="decoupled", tie_qk=True, null_attn=False, rope=True)),
            Case(["--exp", "paper_all", "--size", "tiny", "--run-tag", "a"], _paper_all),
            Case(["--exp", "paper_all", "--out-dir", "x"], refused="each in its own run directory"),
        ],
        "geo_dim": [Case(["--geo-dim", "32"], model_is(geo_dim=32))],
        "grad_accum": [Case(["--grad-accum", "2"], config_is(**{"steps.grad_accum": 2}),
                            effect="tests/test_train.py::test_grad_accum_equals_one_big_batch")],
        "grad_checkpoint": [Case(["--grad-checkpoint"], config_is(**{"precision.grad_checkpoint": True}),
                                 effect="tests/test_train.py::test_grad_checkpoint_changes_nothing")],
        "grad_clip": [Case(["--grad-clip", "0.5"], config_is(**{"optim.grad_clip": 0.5}),
                           effect="parity_tests/test_optim_parity.py::test_optax_torch_numpy_agree")],
        "instrument": [Case(["--instrument", "medium"], lambda o, c: c.analysis.enabled and o["args"]["instrument"] == "medium")],
        "kv_head": [Case(["--attn-mode", "gqa", "--kv-head", "1"], model_is(kv_head=1))],
        "layers": [Case(["--layers", "2"], model_is(n_layer=2))],
        "lion_betas": [Case(["--optimizer", "lion", "--lr", "1e-4", "--lion-betas", "0.8,0.98"],
                            lambda o, c: c.optim.betas == (0.8, 0.98) and o["args"]["lion_betas"] == "0.8,0.98")],
        "live": [Case(["--live", "basic"], config_is(**{"display.live": "basic"}),
                      effect="tests/test_train.py::test_resume_by_steps_and_signals_equals_straight")],
        "live_plot": [Case(["--live-plot"], config_is(**{"analysis.live_plot": True}),
                           effect="tests/test_run.py::test_loop_flags_reach_the_loop")],
        "live_update_every": [Case(["--live-update-every", "5"], config_is(**{"display.update_every": 5}),
                                   effect="tests/test_run.py::test_loop_flags_reach_the_loop")],
        "log_every": [Case(["--log-every", "5"], config_is(**{"display.log_every": 5}),
                           effect="tests/test_run.py::test_loop_flags_reach_the_loop")],
        "lr": [Case(["--lr", "1e-3"], _schedule_is(k0=1e-3, k599=1e-3))],
        "lr_schedule": [Case(["--lr-schedule", "cosine", "--warmup-steps", "10"],
                             _schedule_is(k0=0.0, k5=1e-3, k10=2e-3, k600=0.0))],
        "matmul_precision": [Case(["--matmul-precision", "highest"], _matmul_precision)],
        "min_lr": [Case(["--lr-schedule", "cosine", "--min-lr", "1e-5"], _schedule_is(k0=2e-3, k600=1e-5, k700=1e-5))],
        "mlp": [Case(["--mlp", "gelu"], model_is(mlp="gelu"))],
        "n_head": [Case(["--n-head", "8"], model_is(n_head=8))],
        "no_learned_temp": [Case(["--no-learned-temp"], model_is(learned_temp=False))],
        "no_null_attn": [Case(["--exp", "paper_decoupled", "--no-null-attn"], model_is(null_attn=False, tie_qk=True))],
        "no_rope": [Case(["--no-rope"], model_is(rope=False))],
        "no_tie_qk": [Case(["--exp", "paper_decoupled", "--no-tie-qk"], model_is(tie_qk=False, null_attn=True))],
        "null_attn": [Case(["--null-attn"], model_is(null_attn=True))],
        "opt_foreach": [Case(["--opt-foreach"], _no_effect_recorded("opt_foreach"))],
        "opt_fused": [Case(["--opt-fused"], _no_effect_recorded("opt_fused"))],
        "optimizer": [Case(["--optimizer", "lion", "--lr", "1e-4"], _optimizer_is("lion")),
                      Case(["--optimizer", "adamw"], _optimizer_is("adamw"))],
        "out_dir": [Case(["--out-dir", "x/y"], _run_dir("x/y"))],
        "param_dtype": [Case(["--param-dtype", "bf16"], config_is(**{"precision.param_dtype": "bf16"}),
                             effect="tests/test_train.py::test_bf16_params_and_compute_step"),
                        Case(["--param-dtype", "fp16"], refused="use --param-dtype bf16, or fp32 weights with --amp")],
        "print_config": [Case([], lambda o, c: c.run.print_config and set(o) >= {"model", "args", "run_dir"})],
        "rope": [Case(["--rope"], model_is(rope=True)),
                 Case(["--rope", "--no-rope"], refused="contradict")],
        "rope_base": [Case(["--rope-base", "5000"], model_is(rope_base=5000.0))],
        "run_root": [Case(["--run-root", "myruns", "--lr", "1e-3"], lambda o, c: o["run_dir"].startswith("myruns" + os.sep)),
                     Case(["--run-root", "r", "--size", "tiny", "--exp", "paper_gqa"], _run_dir(os.path.join("r", "tiny_gqa")))],
        # v29: runs/{size}_{exp}_{tag}; without --exp the tag is the run name, as before
        "run_tag": [Case(["--run-tag", "t"], _run_dir(os.path.join("runs", "t"))),
                    Case(["--size", "small", "--exp", "paper_decoupled", "--run-tag", "s1"],
                         _run_dir(os.path.join("runs", "small_decoupled_s1")))],
        "save_every": [Case(["--save-every", "100"], config_is(**{"ckpt.save_every": 100}),
                            effect="tests/test_faults.py::test_faults_then_resume_equal_straight_run")],
        "seed": [Case(["--seed", "7"], _seed_draws)],
        "sem_dim": [Case(["--sem-dim", "16"], model_is(sem_dim=16))],
        "seq_schedule": [Case(["--seq-schedule", "64@0,128@10"],
                              lambda o, c: o["args"]["seq_schedule"] == "64@0,128@10"
                              and o["context"]["longest_train_len"] == 128)],
        # v29: a size preset also sets steps, batch and sequence length unless typed
        "size": [Case(["--size", "small"], _size_small),
                 Case(["--size", "small", "--steps", "5", "--train-seq-len", "256"],
                      args_are(steps=5, batch_size=8, train_seq_len=256))],
        "steps": [Case(["--steps", "50"], both(config_is(**{"steps.steps": 50}), _schedule_is(k0=2e-3)),
                       effect="tests/test_run.py::test_hooks_drive_fit")],
        "sync_timing": [Case(["--sync-timing"], _no_effect_recorded("sync_timing"))],
        "tb": [Case(["--tb"], config_is(**{"analysis.tb": True}), files=["tensorboardX"],
                    effect="tests/test_analysis.py::test_analysis_png_and_tensorboard")],
        "tie_qk": [Case(["--tie-qk"], model_is(tie_qk=True))],
        # v29's default 'word' has no effect on token ids; a named tokenizer is recorded with ids
        "tokenizer": [Case(["--tokenizer", "word"], _no_tokenizer),
                      Case(["--tokenizer", "gpt2"], _tokenizer_recorded("tiktoken", 50257)),
                      Case(["--tokenizer", "tiktoken:gpt2", "--vocab-size", "50304"], model_is(vocab_size=50304)),
                      Case(["--data", f["prose"], "--tokenizer", "word"], refused="no word tokenizer for text"),
                      Case(["--tokenizer", "wordpiece"], refused="unknown tokenizer 'wordpiece'")],
        "train_seq_len": [Case(["--train-seq-len", "64"],
                               lambda o, c: o["args"]["train_seq_len"] == 64 and o["context"]["longest_train_len"] == 64)],
        "val_frac": [Case(["--val-frac", "0.2"], _val_frac)],
        "vocab_size": [Case(["--vocab-size", "300"], model_is(vocab_size=300))],
        "warmup_steps": [Case(["--warmup-steps", "10"], _schedule_is(k0=0.0, k5=1e-3, k10=2e-3, k11=2e-3))],
        "weight_decay": [Case(["--weight-decay", "0.01"], config_is(**{"optim.weight_decay": 0.01}),
                              effect="parity_tests/test_optim_parity.py::test_optax_torch_numpy_agree")],
        # decoding flags: recorded by `dba train`, used by `dba sample`
        "max_new_tokens": [recorded("max_new_tokens", 7,
                                    effect="tests/test_fused_choice.py::test_sample_with_the_kernel_gives_the_same_tokens")],
        "temperature": [recorded("temperature", 0.7,
                                 effect="parity_tests/test_decode_parity.py::test_sampling_is_reproducible_and_filters")],
        "top_k": [recorded("top_k", 5, effect="parity_tests/test_decode_parity.py::test_top_k_and_top_p_filters_agree")],
        "prompt_tokens": [Case(["--prompt-tokens", "10 42 7"], args_are(prompt_tokens="10 42 7"),
                               sample=(["--prompt-tokens", "10 42 7"], {"prompt_tokens": "10 42 7"}),
                               effect="tests/test_v29_flags.py::test_prompt_tokens_take_spaces_and_commas")],
        "kv_decode_block": [Case(["--kv-decode-block", "512"], args_are(kv_decode_block=512),
                                 sample=(["--kv-decode-block", "512"], {"decode_block": 512}),
                                 effect="parity_tests/test_decode_parity.py::test_decode_block_size_does_not_change_results")],
        "kv_fused": [recorded("kv_fused", "none",
                              effect="tests/test_fused_choice.py::test_sample_with_the_kernel_gives_the_same_tokens")],
        "kv_cache": [_kv("kv_cache", "q8_0")],
        "kv_residual": [_kv("kv_residual", 64)],
        "kv_qblock": [_kv("kv_qblock", 64)],
    }
    for s in ("k", "v", "k_sem", "k_geo"):
        t[f"kv_cache_{s}"] = [_kv(f"kv_cache_{s}", "q4_0")]
        t[f"kv_qblock_{s}"] = [_kv(f"kv_qblock_{s}", 16)]
    for key, value in SEED_ARGS.items():
        if key.startswith("self_opt"):
            t[key] = [_self_opt_case(key, value)]
    return t


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("v29flags")
    f = {"base": d / "base.npy", "other": d / "other.npy", "bin": d / "tokens.bin", "ids_txt": d / "ids.txt",
         "prose": d / "prose.txt"}
    np.save(f["base"], (np.arange(50_000) * 7 % 256).astype(np.uint16))
    np.save(f["other"], (np.arange(5_000) % 77).astype(np.uint16))
    (np.arange(5_000) * 13 % 1000).astype(np.uint32).tofile(f["bin"])
    f["ids_txt"].write_text("\n".join(" ".join(str((i * 10 + j) * 7 % 500) for j in range(10)) for i in range(300)))
    f["prose"].write_text("The quick brown fox jumps over the lazy dog; 10 42 7.\n" * 60)
    try:
        import torch

        torch.save(torch.arange(3_000, dtype=torch.int64) % 400, d / "tokens.pt")
        f["pt"] = d / "tokens.pt"
    except ImportError:
        pass
    from dba.config import ModelConfig
    from dba.weights import param_shapes, save_safetensors

    cfg = ModelConfig(vocab_size=256, block_size=64, n_layer=1, n_head=2, d_model=24, d_ff=40, embed_dim=24,
                      attn_mode="decoupled", sem_dim=8, geo_dim=8, attn_dim=16)
    rng = np.random.default_rng(0)
    state = {k: rng.normal(0, 0.02, s).astype(np.float32) for k, s in param_shapes(cfg).items()}
    f["ckpt"] = save_safetensors(d / "tiny.safetensors", cfg, state)
    return f


def _parse(command: str, argv: list[str]):
    from cli.main import _Parser

    module = __import__(f"cli.{command}", fromlist=["add_arguments"])
    p = _Parser(prog=f"dba {command}")
    module.add_arguments(p)
    return p.parse_args(argv)


def _train(argv: list[str], capsys, monkeypatch) -> tuple[int, Any, str]:
    """`dba train --print-config ARGV` in this process: (exit status, printed JSON, stderr)."""
    from cli.main import main

    monkeypatch.setenv("DBA_NO_MALLOC_TUNING", "1")  # leave this process's malloc alone
    try:
        code = main(["train", *argv])
    except SystemExit as e:  # argparse
        code = e.code
    cap = capsys.readouterr()
    return code, (json.loads(cap.out) if code == 0 else None), cap.err


def test_seed_args_copy_is_the_summary():
    assert SUMMARIES and SUMMARIES[0].parent.name == "seed"  # the repository's copy at least
    for summary in SUMMARIES:
        m = re.search(r"## Training Args\s*```json\n(.*?)```", summary.read_text(), re.DOTALL)
        assert json.loads(m.group(1)) == SEED_ARGS, summary


def test_table_covers_every_seed_flag(files):
    t = table(files)
    assert set(t) == set(SEED_ARGS)
    from train.args import FLAG_BY_NAME

    assert set(SEED_ARGS) <= set(FLAG_BY_NAME)  # `dba train` accepts every one
    assert all(t.values()), [k for k, cases in t.items() if not cases]


def _test_exists(ref: str) -> bool:
    """'path/to/test_x.py::test_name' names a test function defined at the top of that file."""
    import ast

    path, _, name = ref.partition("::")
    f = REPO / path
    return f.is_file() and name in {n.name for n in ast.parse(f.read_text()).body if isinstance(n, ast.FunctionDef)}


def test_every_flag_has_its_effect_tested(files):
    """No flag is only echoed: each has a case whose check shows an effect (what the run builds
    from it, or a refusal), or names (`effect=`) the test that shows what the setting does, and
    every such pointer names a test that exists."""
    for key, cases in table(files).items():
        shown = [c for c in cases if c.refused is not None or not getattr(c.check, "echo", False) or c.effect]
        assert shown, f"--{key}: its cases only echo the flag back; check an effect or point to the test of one"
        for c in cases:
            assert c.effect is None or _test_exists(c.effect), (key, c.effect)
    assert not _test_exists("tests/test_run.py::no_such_test") and _test_exists("tests/test_run.py::test_hooks_drive_fit")


@pytest.mark.parametrize("key", sorted(SEED_ARGS))
def test_v29_flag(key, files, capsys, monkeypatch):
    import importlib.util

    from train import args as targs

    cases = table(files)[key]
    monkeypatch.chdir(files["base"].parent)
    not_run = []
    for case in cases:
        missing = [n for n in case.files if n not in files and importlib.util.find_spec(n) is None]
        if missing:  # said below: the test skips, naming what it could not check
            not_run.append(f"{' '.join(case.argv)} (needs {', '.join(missing)})")
            continue
        argv = ["--print-config", "--data", str(files["base"]), *case.argv]
        code, out, err = _train(argv, capsys, monkeypatch)
        if case.refused is not None:
            assert code != 0 and out is None, (case.argv, code)
            lines = err.strip().splitlines()
            assert len(lines) == 1 and case.refused in lines[0] and "Traceback" not in err, (case.argv, err)
            continue
        assert code == 0, (case.argv, err)
        config = None
        if not isinstance(out, list):
            config = targs.run_config(targs.explicit_flags(_parse("train", argv)))
        assert case.check(out, config) is not False, case.argv  # a check may assert or return a bool
        if case.sample is not None:
            sample_argv, want = case.sample
            ns = _parse("sample", ["--ckpt", str(files["ckpt"]), *sample_argv])
            for dest, value in want.items():
                assert getattr(ns, dest) == value, (dest, getattr(ns, dest), value)
    if not_run:
        pytest.skip(f"--{key.replace('_', '-')}: not checked here: {'; '.join(not_run)}")


# ---- flags of the issue that the seed summary does not show -----------------------------------


def test_save_optim_is_accepted(files, capsys, monkeypatch):
    """v29 saved the optimizer state only with --save-optim; dba always saves it."""
    code, out, _ = _train(["--print-config", "--data", str(files["base"]), "--save-optim"], capsys, monkeypatch)
    assert code == 0 and out["args"]["save_optim"] is True


def test_prompt_tokens_take_spaces_and_commas():
    from cli.sample import parse_token_ids

    for text in ("10 42 7", "10,42,7", "10, 42 ,7", " 10\t42\n7 "):
        assert parse_token_ids(text, 100) == [10, 42, 7]
    with pytest.raises(UserError, match="id 427 is outside"):
        parse_token_ids("10 427", 100)
    with pytest.raises(UserError, match="holds no token ids"):
        parse_token_ids(" , ", 100)


def test_help_says_what_each_changed_flag_does(capsys):
    from cli.main import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for needle in ("0 = no analysis", "whitespace-separated integer ids", "utf8 (text to tokenize",
                   "train_decoupled_fast", "the model part only", "paper_all trains those four",
                   "dba always saves it", "fp16 is refused", "tiny 6000/16/1024", "word (v29's default)"):
        assert needle in text, needle
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    assert "--kv-decode-block" in capsys.readouterr().out


# ---- part 4: text in, text out for token-id runs ----------------------------------------------


def _export_with_tokenizer(path: Path, record: dict | None, vocab: int = 256) -> Path:
    from dba.config import ModelConfig
    from dba.weights import param_shapes, save_safetensors

    cfg = ModelConfig(vocab_size=vocab, block_size=64, n_layer=1, n_head=2, d_model=24, d_ff=40, embed_dim=24,
                      attn_mode="decoupled", sem_dim=8, geo_dim=8, attn_dim=16)
    rng = np.random.default_rng(1)
    state = {k: rng.normal(0, 0.05, s).astype(np.float32) for k, s in param_shapes(cfg).items()}
    extra = {"tokenizer": json.dumps(record)} if record is not None else None
    return save_safetensors(path, cfg, state, extra)


def _sample(argv: list[str], capsys) -> tuple[int, str, str]:
    from cli.main import main

    try:
        code = main(["sample", "--max-new-tokens", "4", "--temperature", "0", "--device", "cpu", *argv])
    except SystemExit as e:
        code = e.code
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_ids_run_records_its_tokenizer_and_sample_prints_text(tmp_path, capsys):
    """A run on token ids with --tokenizer keeps the tokenizer's record (what train/run.py writes
    into checkpoint meta and .safetensors metadata); `dba sample --prompt` then takes text and
    prints text."""
    pytest.importorskip("torch")
    from train.batches import RunData
    from train.config import DataConfig

    ids = tmp_path / "ids.npy"
    np.save(ids, np.frombuffer(b"hello world, " * 50, dtype=np.uint8).astype(np.uint16))
    data = RunData.load(DataConfig(path=str(ids), tokenizer="byte"))
    record = data.tokenizer.to_dict()
    assert record == {"name": "byte", "vocab_size": 256}
    assert RunData.load(DataConfig(path=str(ids))).tokenizer is None  # none given: none recorded
    export = _export_with_tokenizer(tmp_path / "best.safetensors", record)
    code, out, err = _sample(["--ckpt", str(export), "--prompt", "hello"], capsys)
    assert code == 0, err
    assert out.startswith("hello") and "," not in out.splitlines()[0][:5]  # text, not ids
    code, out, err = _sample(["--ckpt", str(export), "--prompt-tokens", "104 105"], capsys)
    assert code == 0 and out.startswith("hi"), (out, err)


def test_sample_falls_back_to_ids_when_the_tokenizer_cannot_be_had(tmp_path, capsys, monkeypatch):
    """tiktoken:gpt2 recorded by a GPT-2-id run, sampled where tiktoken (or its BPE files) is
    missing: one line on stderr, ids in and out; --prompt TEXT is a one-line error."""
    pytest.importorskip("torch")
    from dba import data

    def offline(*_a, **_k):
        raise UserError("tokenizer 'tiktoken': the GPT-2 BPE files are not in tiktoken's cache and cannot be "
                        "downloaded (no internet?)", 1)

    monkeypatch.setattr(data, "TiktokenTokenizer", offline)
    export = _export_with_tokenizer(tmp_path / "gpt2.safetensors", data.tokenizer_record("gpt2"), vocab=50257)
    code, out, err = _sample(["--ckpt", str(export), "--prompt-tokens", "464 3290"], capsys)
    assert code == 0, err
    assert re.fullmatch(r"464,3290(,\d+){4}", out.splitlines()[0]), out
    notes = [ln for ln in err.splitlines() if "tiktoken:gpt2" in ln]
    assert len(notes) == 1 and "not available here" in notes[0] and "token ids in and out" in notes[0]
    code, out, err = _sample(["--ckpt", str(export), "--prompt", "The cat"], capsys)
    assert code == 2 and "--prompt-tokens" in err and len(err.strip().splitlines()) == 2  # the note + the error


def test_sample_finds_a_recorded_tokenizer_json_next_to_the_checkpoint(tmp_path, capsys):
    pytest.importorskip("torch")
    pytest.importorskip("tokenizers")
    from dba.data import tokenizer_record
    from tests.support import write_hf_tokenizer

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    tj = write_hf_tokenizer(elsewhere / "tokenizer.json")
    record = tokenizer_record(str(tj))
    run = tmp_path / "run"
    run.mkdir()
    export = _export_with_tokenizer(run / "best.safetensors", record, vocab=8)
    tj.rename(run / "tokenizer.json")  # the recorded path is gone; the copy beside the export is used
    code, out, err = _sample(["--ckpt", str(export), "--prompt", "hello cat"], capsys)
    assert code == 0, err
    assert out.startswith("hello cat"), out


def test_runs_recorded_before_keep_their_meaning():
    """Flags saved before v29's meanings were restored (no save_optim): 'text' was text to
    tokenize and analysis_every 0 meant every evaluation; today's records are read as written."""
    from train.args import run_config, saved_flags

    old = {"data_format": "text", "analysis_every": 0, "instrument": "full", "lr": 1e-3}
    assert saved_flags(old) == {"data_format": "utf8", "analysis_every": None, "instrument": "full", "lr": 1e-3}
    assert run_config({}, base=saved_flags(old)).analysis.enabled
    new = run_config({"instrument": "full", "analysis_every": 0, "data_format": "text"}).to_flags()
    assert saved_flags(new) == new and not run_config({}, base=saved_flags(new)).analysis.enabled
