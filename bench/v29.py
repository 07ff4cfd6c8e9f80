"""v29 beside dba in one run, on the same weights and data: train steps and q4_0 generation.

Point it at v29's script (`--v29 PATH`: v29_transformer_decoupled_bottleneck_instrumented.py);
it is imported from that path and never copied. v29's `ModelConfig` and `GPT` build config A
(bench.common; the model is v29's initialisation from --seed, with the learned temperatures and
the null key/values drawn N(0, 0.3) instead of v29's zeros so the check below covers them), and
the same weights load into dba's torch model (torch_ref) and its JAX model (jax_model). dba's
config is v29's read as a v29 payload (`ModelConfig.from_dict(..., v29=True)`), so a decoupled
model without null attention scores at `v29_sdpa`, the scale v29 trains it with (SPEC §3).

Checks, before anything is timed: each dba model's fp32 logits on the same 2 x 128 tokens
against v29's, max |diff| <= 1e-5 (torch) / 3e-5 (JAX) times max(1, max |logit|) (DESIGN's fp32
agreement: 1e-5 torch vs v29, 2e-5 JAX vs torch), else a one-line error and nothing is timed.
Beside it, the torch model with the other decoupled_scale, to show the check would catch a
wrong temperature. After the first fp32 training step on the same batch, the share of parameter
elements within 1e-6 of v29's (a Lion step moves each by +-lr, so a flipped sign shows).

Training (`--parts train`): one optimizer step per call, batch 8 x seq 256 (--batch-size,
--seq-len), the same 4 batches of random tokens cycled, Lion lr 3e-4, weight decay 0.1, clip 1.0,
as `dba bench train` sets them (bench.common.bench_optim):
- v29: its training loop's step: zero_grad, forward and cross-entropy under its autocast,
  backward, clip_grad_norm_ (read back, as v29 logs it), its Lion. No data loading, no
  gradient-norm logging (v29 does that every --log-every steps).
- dba torch: torch_train.step.TorchStepper, the step of `dba train --backend torch`.
- dba JAX: train.step.Stepper with train.optim.build_optimizer, the step of `dba train`
  (compile time reported apart).
Precisions (`--precisions`): fp32; amp = fp32 parameters, bf16 autocast (v29 --amp; dba --amp);
bf16 = bf16 parameters and bf16 compute (v29 --param-dtype bf16 --amp, the seed run's setting;
dba --param-dtype bf16 --amp). dba's optimizer is --optimizer (default lion_v29: v29's Lion
arithmetic, so all three take the same step). Reported: median ms/step and tokens/s over
--steps calls after --warmup untimed ones, the ratio to v29 at the same precision and to
v29's fastest row, and the first step's loss (all on batch 0 from the same weights). The torch
steps run round-robin (one call each per round) so a neighbour's load hits them alike.

Generation (`--parts generate`): a 2048-token prompt (--prompt-len) of random tokens, 64 new
tokens (--new-tokens), greedy, batch 1, q4_0 cache with v29's heterogeneous default (k_sem
q4_0, k_geo q8_0, v q4_0; qblock 32, 128-token fp16 window), decode block 1024, fp32 weights:
- v29: `GPT.generate(..., top_k=1, kv_cache="q4_0")` (its sampler with top_k=1 is greedy);
- dba torch: `torch_ref.generate(..., temperature=0)`; dba torch compiled: the same with every
  new token through `torch_ref.compiled_decode.CompiledDecoder` (`dba sample --compile`); dba
  JAX: `jax_model.generate(...)` (the first call compiles: reported as warm-up and excluded).
Prefill time: torch, from the call to the end of the first forward (the prompt; hooked, not
re-run); JAX, the same `decode.prefill` timed on its own in each repeat (its generate is
compiled and asynchronous). Decode time = generate's time - prefill time. Reported, median of
--repeats: prefill s and tok/s, decode tok/s, tok/s counting the prefill (new tokens / whole
generate), ratios to v29, and how many of the new tokens equal v29's (all of them, and the
leading run). Greedy tokens need not agree exactly: v29's and dba's attention sum in other
orders, and a near-tie in the logits can flip an argmax, after which the texts part.

Where: v29 and torch_ref run in this process with the same torch intra-op threads (--threads);
JAX runs in a fresh process (bench.common.in_fresh_process, before the torch timings, with the
host malloc tuning `dba train` applies: --malloc-tuning), so XLA's and torch's thread pools
never compete.

    dba bench v29 --v29 ~/v29/v29_transformer_decoupled_bottleneck_instrumented.py --json v29.json
    dba bench v29 --v29 PATH --parts generate --repeats 5
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (DEVICE_HELP, DEVICES, bench_main, bench_optim, in_fresh_process, machine, named_config,
                          nonneg_int, positive_int, print_table, torch_device, torch_sync, write_json)
from dba.config import ConfigError, ModelConfig
from dba.errors import UserError
from dba.kvspec import KVPolicy
from dba.optimizers import DEFAULT_BETAS, OPTIMIZERS

SCRIPT = "v29_transformer_decoupled_bottleneck_instrumented.py"
MODULE_NAME = "_dba_bench_v29_script"  # v29's module, as sys.modules knows it (its dataclasses look it up)
PARTS = ("train", "generate")
# --precisions: (parameter dtype, bf16 compute)
PRECISIONS = {"fp32": ("fp32", False), "amp": ("fp32", True), "bf16": ("bf16", True)}
TORCH_TOL, JAX_TOL = 1e-5, 3e-5  # fp32 logits vs v29, times max(1, max |logit|)
STEP_ATOL = 1e-6  # a parameter element "moved as v29's did" after one step
INIT_STD = 0.3  # the learned temperatures and null key/values (v29 starts them at zero)
CHECK_SHAPE = (2, 128)  # tokens of the logits check


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__.split("\n\n")[0]
    p.epilog = "\n\n".join(__doc__.split("\n\n")[1:])
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--v29", required=True, metavar="PATH", help=f"v29's script ({SCRIPT})")
    p.add_argument("--parts", default="train,generate", help="what to measure, comma separated: train, generate")
    p.add_argument("--backends", default="jax,torch,torch-compile",
                   help="the dba sides beside v29: jax, torch, torch-compile (training: `dba train --backend torch "
                        "--compile`'s step; generation: every new token through torch_ref.compiled_decode; "
                        "the compile in the first step / the warm-up)")
    p.add_argument("--null-attn", choices=("auto", "on", "off"), default="auto",
                   help="config A's null attention (auto: off for training as `dba bench train` runs it, "
                        "on for generation as `dba bench decode` does)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--seq-len", type=positive_int, default=256)
    p.add_argument("--steps", type=positive_int, default=10, help="timed train steps per row")
    p.add_argument("--warmup", type=nonneg_int, default=2, help="untimed steps after the first one")
    p.add_argument("--precisions", default="fp32,amp,bf16", help="comma separated: " + ", ".join(PRECISIONS))
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="lion_v29",
                   help="dba's optimizer (v29 always steps with its own Lion)")
    p.add_argument("--prompt-len", type=positive_int, default=2048)
    p.add_argument("--new-tokens", type=positive_int, default=64)
    p.add_argument("--decode-block", type=positive_int, default=1024)
    p.add_argument("--residual", type=nonneg_int, default=128, help="the cache's fp16 window of newest tokens")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed generations per side (median reported)")
    p.add_argument("--threads", type=nonneg_int, default=0, help="torch intra-op threads, v29 and dba alike (0 = all cores)")
    p.add_argument("--malloc-tuning", choices=("jax", "none"), default="jax",
                   help="run the JAX process with train.step.tune_host_malloc, as dba train does")
    p.add_argument("--device", choices=DEVICES, default="auto", help=DEVICE_HELP)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results here")


# ---- v29's script ------------------------------------------------------------------------------
def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


def load_v29(path: str | os.PathLike) -> Any:
    """v29's script imported from `path` (importlib, by file path), with the classes the benchmark
    uses checked; a missing file, a file that is not v29's or a failing import is a one-line
    UserError."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"--v29 {str(path)!r}: no such file (expected v29's script, {SCRIPT})", 1)
    if not p.is_file():
        raise UserError(f"--v29 {str(path)!r} is not a file (expected v29's script, {SCRIPT})", 1)
    spec = importlib.util.spec_from_file_location(MODULE_NAME, p)
    if spec is None or spec.loader is None:
        raise UserError(f"--v29 {str(path)!r} is not a Python file (expected v29's script, {SCRIPT})", 1)
    module = importlib.util.module_from_spec(spec)
    sys.modules[MODULE_NAME] = module
    try:
        spec.loader.exec_module(module)
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001  SyntaxError, ImportError, SystemExit, anything the file raises
        sys.modules.pop(MODULE_NAME, None)
        raise UserError(f"--v29 {str(path)!r}: importing it failed: {_first_line(e)}", 1) from None
    lacks = v29_lacks(module)
    if lacks:
        sys.modules.pop(MODULE_NAME, None)
        raise UserError(f"--v29 {str(path)!r} is not v29's script: it has no {', '.join(lacks)}", 1)
    return module


def v29_lacks(module: Any) -> list[str]:
    """What of v29's API `module` does not have: ModelConfig (a dataclass), GPT (a torch module
    with generate), Lion (a torch optimizer)."""
    import torch

    def cls(name: str):
        obj = getattr(module, name, None)
        return obj if isinstance(obj, type) else None

    lacks = []
    if cls("ModelConfig") is None or not dataclasses.is_dataclass(cls("ModelConfig")):
        lacks.append("ModelConfig dataclass")
    gpt = cls("GPT")
    if gpt is None or not issubclass(gpt, torch.nn.Module) or not callable(getattr(gpt, "generate", None)):
        lacks.append("GPT model with generate()")
    lion = cls("Lion")
    if lion is None or not issubclass(lion, torch.optim.Optimizer):
        lacks.append("Lion optimizer")
    return lacks


def v29_config(v29: Any, cfg: ModelConfig, source: str) -> tuple[Any, ModelConfig]:
    """(v29's ModelConfig for `cfg`, dba's config read back from it as a v29 payload): the second
    differs from `cfg` only in decoupled_scale, which v29 implies from attn_mode and null_attn."""
    theirs_names = {f.name for f in dataclasses.fields(v29.ModelConfig)}
    defaults = ModelConfig().to_dict()
    # dba's later options (RMSNorm, biases, untied head, RoPE scaling, ...) are v29's model at
    # their defaults: only a field set otherwise needs v29 to have it
    fields = {k: v for k, v in cfg.to_dict().items()
              if k != "decoupled_scale" and (k in theirs_names or v != defaults.get(k))}
    lacking = sorted(set(fields) - theirs_names)
    if lacking:
        raise UserError(f"--v29 {source!r}: its ModelConfig has no {', '.join(lacking)} (not the v29 dba reads)", 1)
    try:
        theirs = v29.ModelConfig(**fields)
        ours = ModelConfig.from_dict(dataclasses.asdict(theirs), v29=True)
    except (ConfigError, TypeError, ValueError) as e:
        raise UserError(f"--v29 {source!r}: its ModelConfig does not read as dba's: {_first_line(e)}", 1) from None
    return theirs, ours


def v29_model(v29: Any, v29_cfg: Any, seed: int):
    """(v29's GPT on the CPU, its weights as canonical numpy arrays): v29's initialisation from
    `seed`, the learned temperatures and null key/values then drawn N(0, INIT_STD)."""
    import torch

    torch.manual_seed(seed)
    model = v29.GPT(v29_cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("logit_scale", "_null")):
                p.copy_(torch.randn(p.shape, generator=g) * INIT_STD)
    state = {k: v.detach().float().cpu().numpy().copy() for k, v in model.state_dict().items()}
    return model.eval(), state


# ---- pure pieces -------------------------------------------------------------------------------
def tolerance(rel: float, ref: np.ndarray) -> float:
    """`rel` times max(1, max |ref|): the fp32 agreement bound for logits of that scale."""
    return rel * max(1.0, float(np.abs(ref).max()))


def max_abs_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def step_agreement(ref: dict[str, np.ndarray], other: dict[str, np.ndarray], atol: float = STEP_ATOL) -> dict:
    """How closely `other`'s parameters follow `ref`'s after the same step: the share of elements
    within `atol`, and the largest difference."""
    same = total = 0
    worst = 0.0
    for name, a in ref.items():
        d = np.abs(np.asarray(other[name], np.float64) - np.asarray(a, np.float64))
        same += int((d <= atol).sum())
        total += d.size
        worst = max(worst, float(d.max()) if d.size else 0.0)
    return {"fraction_within": same / total if total else 1.0, "within": same, "elements": total, "max_abs": worst,
            "atol": atol}


def token_agreement(ref, other) -> dict:
    """Positions where `other` equals `ref`, and the length of the leading run that agrees."""
    ref, other = np.asarray(ref).ravel(), np.asarray(other).ravel()
    n = min(len(ref), len(other))
    eq = ref[:n] == other[:n]
    lead = int(np.argmin(eq)) if not eq.all() else n
    return {"equal": int(eq.sum()), "leading": lead, "of": len(ref)}


def ratio(x: float, ref: float | None) -> float | None:
    return None if not ref else x / ref


def fmt_ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def train_summary(results: list[dict], tokens_per_step: int) -> list[list[str]]:
    """Adds step_ms_median, step_ms_best, tokens_per_s and the ratios to v29 (at the same
    precision, and to v29's fastest row) to each result; returns the table's rows."""
    for r in results:
        med = statistics.median(r["step_s"])
        r.update(step_ms_median=1e3 * med, step_ms_best=1e3 * min(r["step_s"]), tokens_per_s=tokens_per_step / med)
    v29 = {r["precision"]: r["tokens_per_s"] for r in results if r["impl"] == "v29"}
    fastest = max(v29.values()) if v29 else None
    rows = []
    for r in results:
        r["vs_v29_same_precision"] = ratio(r["tokens_per_s"], v29.get(r["precision"]))
        r["vs_v29_fastest"] = ratio(r["tokens_per_s"], fastest)
        rows.append([r["impl"], r["precision"], f"{r['tokens_per_s']:,.0f}", f"{r['step_ms_median']:.1f}",
                     f"{r['step_ms_best']:.1f}", fmt_ratio(r["vs_v29_same_precision"]), fmt_ratio(r["vs_v29_fastest"]),
                     f"{r['setup_s']:.2f}", f"{r['first_loss']:.6f}"])
    return rows


def generate_summary(results: list[dict], new_tokens: int, prompt_len: int) -> list[list[str]]:
    """Adds the medians, rates, ratios to v29 and the token agreement with v29 to each result
    (`prefill_s`, `total_s` per repeat; decode = total - prefill); returns the table's rows."""
    for r in results:
        pre, tot = statistics.median(r["prefill_s"]), statistics.median(r["total_s"])
        dec = statistics.median([t - p for t, p in zip(r["total_s"], r["prefill_s"])])
        r.update(prefill_s_median=pre, decode_s_median=dec, total_s_median=tot, prefill_tok_s=prompt_len / pre,
                 decode_tok_s=new_tokens / dec, tok_s_incl_prefill=new_tokens / tot)
    v29 = next((r for r in results if r["impl"] == "v29"), None)
    rows = []
    for r in results:
        if v29 is not None:
            r["vs_v29"] = {"prefill": ratio(v29["prefill_s_median"], r["prefill_s_median"]),
                           "decode": ratio(r["decode_tok_s"], v29["decode_tok_s"]),
                           "incl_prefill": ratio(r["tok_s_incl_prefill"], v29["tok_s_incl_prefill"])}
            r["tokens_vs_v29"] = token_agreement(v29["tokens"], r["tokens"])
        vs = r.get("vs_v29", {})
        agree = r.get("tokens_vs_v29")
        rows.append([r["impl"], f"{r['prefill_s_median']:.3f}", f"{r['prefill_tok_s']:,.0f}",
                     f"{r['decode_tok_s']:,.1f}", f"{r['tok_s_incl_prefill']:,.1f}", fmt_ratio(vs.get("prefill")),
                     fmt_ratio(vs.get("decode")), fmt_ratio(vs.get("incl_prefill")),
                     "n/a" if agree is None else f"{agree['equal']}/{agree['of']} (first {agree['leading']})",
                     f"{r['warmup_s']:.1f}"])
    return rows


def round_robin(steps: dict[str, Callable[[int], float]], warmup: int, n_steps: int,
                after_first: Callable[[str], None] | None = None) -> dict[str, dict]:
    """Each `steps[name](k)` (one blocking train step on batch k) once on k = 0 (its first call:
    seconds and loss kept), `warmup` untimed rounds, then `n_steps` timed rounds, every name
    once per round (the order reversed every other round)."""
    out: dict[str, dict] = {name: {"step_s": []} for name in steps}
    for name, step in steps.items():
        t0 = time.perf_counter()
        loss = step(0)
        out[name].update(first_step_s=time.perf_counter() - t0, first_loss=float(loss))
        if after_first is not None:
            after_first(name)
    order = list(steps)
    for k in range(1, 1 + warmup + n_steps):
        for name in (order if k % 2 else order[::-1]):
            t0 = time.perf_counter()
            steps[name](k)
            if k > warmup:
                out[name]["step_s"].append(time.perf_counter() - t0)
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---- torch: v29 and torch_ref (this process) ---------------------------------------------------
class V29Step:
    """One step of v29's training loop (grad_accum 1) on v29's GPT at `precision`."""

    def __init__(self, v29: Any, v29_cfg: Any, state: dict, precision: str, device: str, args: argparse.Namespace):
        import torch

        param, amp = PRECISIONS[precision]
        model = v29.GPT(v29_cfg).to(device)
        if param == "bf16":
            model = model.to(dtype=torch.bfloat16)
        model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
        o = bench_optim(args)
        self.model, self.clip = model, float(o.grad_clip)
        self.opt = v29.Lion(model.parameters(), lr=o.lr, betas=DEFAULT_BETAS["lion"], weight_decay=o.weight_decay)
        self.autocast = torch.amp.autocast(device_type=device, dtype=torch.bfloat16) if amp else nullcontext()

    def __call__(self, x, y) -> float:
        import torch
        import torch.nn.functional as F

        model = self.model
        model.train()
        self.opt.zero_grad(set_to_none=True)
        with self.autocast:
            logits, _ = model(x)
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), self.clip).detach().to("cpu").item()
        self.opt.step()
        return float(loss.detach().float().item())

    def state(self) -> dict[str, np.ndarray]:
        return {k: v.detach().float().cpu().numpy().copy() for k, v in self.model.state_dict().items()}


class TorchRefStep:
    """One step of `dba train --backend torch` (TorchStepper) on torch_ref's model at `precision`."""

    def __init__(self, cfg: ModelConfig, state: dict, precision: str, device: str, args: argparse.Namespace,
                 compile: bool = False):
        import torch

        import torch_ref
        from torch_train.step import TorchStepper
        from train.config import PrecisionConfig

        param, amp = PRECISIONS[precision]
        model = torch_ref.load_canonical(torch_ref.DBAModel(cfg), state, "v29's weights").to(device)
        if param == "bf16":
            model = model.to(torch.bfloat16)
        self.stepper = TorchStepper(model, bench_optim(args), PrecisionConfig(amp=amp, amp_dtype="bf16"),
                                    total_steps=10_000, seed=args.seed, compile=compile)
        self.count = 0

    def __call__(self, x, y) -> float:
        s = self.stepper
        m = s.fetch(s.train_step(x[None], y[None], self.count))  # fetch: the sync point
        self.count += 1
        return float(m["loss"])

    def state(self) -> dict[str, np.ndarray]:
        return self.stepper.canonical_state()


def torch_logits_check(v29_net, cfg: ModelConfig, state: dict, tokens: np.ndarray) -> tuple[dict, np.ndarray]:
    """v29's fp32 logits on `tokens`, torch_ref's against them (a UserError past the tolerance),
    and the same model with the other decoupled_scale as a control."""
    import torch

    import torch_ref

    t = torch.as_tensor(tokens, dtype=torch.long)
    with torch.no_grad():
        ref = v29_net(t)[0].float().numpy()
        ours = torch_ref.load_canonical(torch_ref.DBAModel(cfg), state).eval()(t).numpy()
        other_scale = "per_path" if cfg.decoupled_scale == "v29_sdpa" else "v29_sdpa"
        other = torch_ref.load_canonical(torch_ref.DBAModel(cfg.replace(decoupled_scale=other_scale)), state).eval()
        control = max_abs_diff(ref, other(t).numpy())
    err, tol = max_abs_diff(ref, ours), tolerance(TORCH_TOL, ref)
    if not err <= tol:
        raise UserError(f"v29's and torch_ref's fp32 logits differ by {err:.3g} > {tol:.3g} (null_attn="
                        f"{cfg.null_attn}, decoupled_scale={cfg.decoupled_scale}): not the same model; nothing timed", 1)
    return {"null_attn": cfg.null_attn, "decoupled_scale": cfg.decoupled_scale, "max_abs_logit": float(np.abs(ref).max()),
            "torch_max_abs_diff": err, "torch_tol": tol, "control_scale": other_scale,
            "control_max_abs_diff": control}, ref


def time_torch_training(v29: Any, v29_cfg: Any, cfg: ModelConfig, state: dict, batches: list, args, device: str,
                precisions: list[str], backends: list[str]) -> tuple[list[dict], dict]:
    """v29's and torch_ref's steps, round-robin; (results, fp32 states after the first step)."""
    import torch

    xs = [torch.as_tensor(x, dtype=torch.long).to(device) for x, _ in batches]
    ys = [torch.as_tensor(y, dtype=torch.long).to(device) for _, y in batches]
    runners, setup = {}, {}
    for prec in precisions:
        impls = (["v29"] + (["dba torch"] if "torch" in backends else [])
                 + (["dba torch compiled"] if "torch-compile" in backends else []))
        for impl in impls:
            t0 = time.perf_counter()
            runners[(impl, prec)] = (V29Step(v29, v29_cfg, state, prec, device, args) if impl == "v29"
                                     else TorchRefStep(cfg, state, prec, device, args,
                                                       compile=impl == "dba torch compiled"))
            setup[(impl, prec)] = time.perf_counter() - t0

    def bind(runner):
        def step(k: int) -> float:
            out = runner(xs[k % len(xs)], ys[k % len(ys)])
            torch_sync(device)
            return out
        return step

    after: dict[str, dict] = {}
    names = {f"{impl}|{prec}": (impl, prec) for impl, prec in runners}

    def keep(name: str) -> None:
        impl, prec = names[name]
        if prec == "fp32":
            after[impl] = runners[(impl, prec)].state()

    timed = round_robin({n: bind(runners[key]) for n, key in names.items()}, args.warmup, args.steps, keep)
    results = []
    for n, (impl, prec) in names.items():
        r = timed[n]
        results.append({"impl": impl, "precision": prec, "where": "this process", "threads": torch.get_num_threads(),
                        "setup_s": r["first_step_s"], "step_s": r["step_s"], "first_loss": r["first_loss"],
                        "build_s": setup[(impl, prec)]})
    return results, after


def _stamp_first(stamps: list, device: str) -> None:
    if not stamps:
        torch_sync(device)
        stamps.append(time.perf_counter())


def v29_generate(net, prompt, args, device: str) -> tuple[np.ndarray, float, float]:
    """(new tokens, prefill s, total s) of v29's own generate, greedy (top_k=1), q4_0 cache; the
    prefill ends when its first forward (the prompt) returns."""
    stamps: list[float] = []
    handle = net.register_forward_hook(lambda mod, inputs, output: _stamp_first(stamps, device))
    try:
        torch_sync(device)
        t0 = time.perf_counter()
        out = net.generate(prompt, max_new_tokens=args.new_tokens, temperature=1.0, top_k=1, kv_cache="q4_0",
                           kv_qblock=32, kv_residual=args.residual, kv_decode_block=args.decode_block)
        torch_sync(device)
        total = time.perf_counter() - t0
    finally:
        handle.remove()
    if not stamps:
        raise UserError("v29's GPT.generate never called its forward: not the v29 this benchmark reads", 1)
    return out[0, prompt.shape[1]:].cpu().numpy(), stamps[0] - t0, total


def torch_ref_generate(model, prompt, policy: KVPolicy, args, device: str,
                       decoder=None) -> tuple[np.ndarray, float, float]:
    """(new tokens, prefill s, total s) of torch_ref.generate, greedy (every new token through
    `decoder.step` when a CompiledDecoder is given); the prefill ends when the first
    forward_cached (the prompt) returns."""
    import torch_ref

    stamps: list[float] = []
    plain = model.forward_cached

    def forward_cached(*a, **kw):
        del model.forward_cached  # the first call only: the compiled step traces the class's method
        out = plain(*a, **kw)
        _stamp_first(stamps, device)
        return out

    model.forward_cached = forward_cached  # an instance attribute: generate calls it, the class is untouched
    try:
        torch_sync(device)
        t0 = time.perf_counter()
        kw = dict(max_new_tokens=args.new_tokens, policy=policy, temperature=0.0, decode_block=args.decode_block)
        out = torch_ref.generate(model, prompt, **kw) if decoder is None else decoder.generate(prompt, **kw)
        torch_sync(device)
        total = time.perf_counter() - t0
    finally:
        model.__dict__.pop("forward_cached", None)
    return out[0, prompt.shape[1]:].cpu().numpy(), stamps[0] - t0, total


def time_torch_generation(net, cfg: ModelConfig, state: dict, prompt_np: np.ndarray, args, device: str,
                     backends: list[str]) -> list[dict]:
    """v29's generate and torch_ref's, a warm-up each, then `repeats` rounds alternating them."""
    import torch

    import torch_ref

    prompt = torch.as_tensor(prompt_np, dtype=torch.long).to(device)
    policy = KVPolicy(kind="q4_0", residual=args.residual)
    net = net.to(device)
    runs: dict[str, Callable[[], tuple]] = {"v29": lambda: v29_generate(net, prompt, args, device)}
    if "torch" in backends or "torch-compile" in backends:
        model = torch_ref.load_canonical(torch_ref.DBAModel(cfg), state).eval().to(device)
    if "torch" in backends:
        runs["dba torch"] = lambda: torch_ref_generate(model, prompt, policy, args, device)
    if "torch-compile" in backends:
        from torch_ref.compiled_decode import CompiledDecoder

        decoder = CompiledDecoder(model, args.decode_block)  # compiles in its warm-up run
        runs["dba torch compiled"] = lambda: torch_ref_generate(model, prompt, policy, args, device, decoder)
    out = {}
    for name, fn in runs.items():
        t0 = time.perf_counter()
        fn()  # allocator / oneDNN warm-up, the analogue of compiling
        out[name] = {"impl": name, "where": "this process", "threads": torch.get_num_threads(),
                     "warmup_s": time.perf_counter() - t0, "prefill_s": [], "total_s": []}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            tokens, pre, tot = fn()
            out[name]["prefill_s"].append(pre)
            out[name]["total_s"].append(tot)
            out[name]["tokens"] = tokens.tolist()
    return list(out.values())


# ---- JAX (a fresh process) ---------------------------------------------------------------------
def _jax_child(job: dict) -> dict:
    """The JAX side: logits checks, then train steps, then generation."""
    args = job["args"]
    if args.malloc_tuning == "jax":
        from train.step import tune_host_malloc

        tune_host_malloc()  # before JAX starts its thread pools
    import jax
    import jax.numpy as jnp

    import jax_model

    out: dict[str, Any] = {"jax": jax.__version__, "platform": jax.default_backend(),
                           "device_name": jax.devices()[0].device_kind, "checks": {}}
    for part, (cfg, state, ref) in job["models"].items():
        model = jax_model.load_canonical(jax_model.DBAModel(cfg), state, "v29's weights")
        logits = np.asarray(model(jnp.asarray(job["check_tokens"], jnp.int32)))
        err, tol = max_abs_diff(ref, logits), tolerance(JAX_TOL, ref)
        if not err <= tol:
            raise UserError(f"v29's and jax_model's fp32 logits differ by {err:.3g} > {tol:.3g} (null_attn="
                            f"{cfg.null_attn}, decoupled_scale={cfg.decoupled_scale}): not the same model; "
                            "nothing timed", 1)
        out["checks"][part] = {"jax_max_abs_diff": err, "jax_tol": tol}
    if "train" in job["parts"]:
        out["train"], out["after_first"] = _jax_train(job["models"]["train"][:2], job["batches"], args,
                                                      job["precisions"])
    if "generate" in job["parts"]:
        out["generate"] = _jax_generate(job["models"]["generate"][:2], job["prompt"], args)
    return out


def _jax_train(model_state: tuple, batches: list, args, precisions: list[str]) -> tuple[list[dict], dict | None]:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import jax_model
    from train.optim import build_optimizer
    from train.step import Stepper

    cfg, state = model_state
    xs = [jax.device_put(np.asarray(x, np.int32)[None]) for x, _ in batches]
    ys = [jax.device_put(np.asarray(y, np.int32)[None]) for _, y in batches]
    steppers, compile_s = {}, {}
    for prec in precisions:
        param, amp = PRECISIONS[prec]
        pdt = jnp.bfloat16 if param == "bf16" else jnp.float32
        model = jax_model.DBAModel(cfg, rngs=nnx.Rngs(args.seed), dtype=jnp.bfloat16 if amp else pdt, param_dtype=pdt)
        jax_model.load_canonical(model, state, "v29's weights")
        s = Stepper(model, build_optimizer(bench_optim(args), 10_000), seed=args.seed)
        compile_s[prec] = s.compile_for(xs[0], ys[0])
        steppers[prec] = s

    def bind(s):
        def step(k: int) -> float:
            m = s.train_step(xs[k % len(xs)], ys[k % len(ys)], k)
            jax.block_until_ready((m, s.params))
            return float(m["loss"])
        return step

    after: dict[str, Any] = {}

    def keep(prec: str) -> None:
        if prec == "fp32":
            after["state"] = steppers[prec].canonical_state()

    timed = round_robin({p: bind(s) for p, s in steppers.items()}, args.warmup, args.steps, keep)
    results = [{"impl": "dba JAX", "precision": p, "where": "fresh process", "compile_s": compile_s[p],
                "setup_s": compile_s[p] + r["first_step_s"], "step_s": r["step_s"], "first_loss": r["first_loss"]}
               for p, r in timed.items()]
    return results, after.get("state")


def _jax_generate(model_state: tuple, prompt_np: np.ndarray, args) -> dict:
    import jax
    import jax.numpy as jnp

    import jax_model
    from jax_model import kvcache as kvc
    from jax_model.decode import prefill

    cfg, state = model_state
    model = jax_model.load_canonical(jax_model.DBAModel(cfg), state, "v29's weights")
    policy = KVPolicy(kind="q4_0", residual=args.residual)
    prompt = jnp.asarray(prompt_np, jnp.int32)
    t, new = prompt.shape[1], args.new_tokens

    def generate():
        return jax.block_until_ready(jax_model.generate(model, prompt, new, policy, temperature=0.0,
                                                        decode_block=args.decode_block))

    def prefill_only():  # what generate does before its token loop
        cache = kvc.init_cache(cfg, policy, 1, t + new)
        return jax.block_until_ready(prefill(model, cache, prompt, decode_block=args.decode_block, last_only=True))

    t0 = time.perf_counter()
    generate()
    warm = time.perf_counter() - t0
    prefill_only()
    r = {"impl": "dba JAX", "where": "fresh process", "warmup_s": warm, "prefill_s": [], "total_s": []}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        prefill_only()
        r["prefill_s"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        out = generate()
        r["total_s"].append(time.perf_counter() - t0)
    r["tokens"] = np.asarray(out)[0, t:].tolist()
    return r


# ---- the run -----------------------------------------------------------------------------------
def _choices(text: str, allowed, flag: str) -> list[str]:
    items = [s for s in text.split(",") if s]
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        raise UserError(f"{flag} {text!r}: choose from {', '.join(allowed)}", 2)
    return items


def run(args: argparse.Namespace) -> int:
    parts = _choices(args.parts, PARTS, "--parts")
    backends = _choices(args.backends, ("jax", "torch", "torch-compile"), "--backends")
    precisions = _choices(args.precisions, tuple(PRECISIONS), "--precisions")
    v29 = load_v29(args.v29)  # one line and out, before anything is built
    import torch

    device = torch_device(args.device)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    rng = np.random.default_rng(args.seed)
    a = named_config("A")
    check_tokens = rng.integers(0, a.vocab_size, (CHECK_SHAPE[0], min(CHECK_SHAPE[1], a.block_size))).astype(np.int64)

    # One model per part: config A with the part's null attention, v29's weights, dba's config.
    models, nets, checks, refs = {}, {}, {}, {}
    for part in parts:
        null = {"on": True, "off": False}.get(args.null_attn, part == "generate")
        v29_cfg, cfg = v29_config(v29, named_config("A", null_attn=null), str(args.v29))
        net, state = v29_model(v29, v29_cfg, args.seed)
        checks[part], refs[part] = torch_logits_check(net, cfg, state, check_tokens)
        models[part], nets[part] = (v29_cfg, cfg, state), net
    print(f"v29: {args.v29}")
    for part, c in checks.items():
        print(f"  {part} model: config A, null_attn={c['null_attn']} -> dba decoupled_scale={c['decoupled_scale']}; "
              f"fp32 logits vs v29 (max |logit| {c['max_abs_logit']:.3f}): torch_ref {c['torch_max_abs_diff']:.2e} "
              f"<= {c['torch_tol']:.1e}; with decoupled_scale={c['control_scale']} it would be "
              f"{c['control_max_abs_diff']:.2e}", flush=True)

    b, t = args.batch_size, args.seq_len
    batches = []
    for _ in range(4):
        tok = rng.integers(0, a.vocab_size, (b, t + 1)).astype(np.int64)
        batches.append((tok[:, :-1].copy(), tok[:, 1:].copy()))
    prompt = rng.integers(0, a.vocab_size, (1, args.prompt_len)).astype(np.int64)

    jax_out: dict[str, Any] = {}
    if "jax" in backends:
        print("JAX: a fresh process (logits check, then its timings)", flush=True)
        job = {"args": args, "parts": parts, "precisions": precisions, "check_tokens": check_tokens,
               "models": {p: (models[p][1], models[p][2], refs[p]) for p in parts}, "batches": batches,
               "prompt": prompt}
        jax_out = in_fresh_process(_jax_child, job)
        for part, c in jax_out["checks"].items():
            checks[part].update(c)
            print(f"  {part} model: jax_model {c['jax_max_abs_diff']:.2e} <= {c['jax_tol']:.1e}", flush=True)

    threads = torch.get_num_threads()
    where = {"v29": f"this process, torch {torch.__version__}, {threads} intra-op threads, device {device}",
             "dba torch": f"this process, the same torch threads, device {device}",
             "dba torch compiled": "the same, the step (training) / decode step (generation) under torch.compile",
             "dba JAX": (f"a fresh process, jax {jax_out['jax']} on {jax_out['platform']}"
                         + (", malloc tuned" if args.malloc_tuning == "jax" else "") if jax_out else "not run")}
    payload: dict[str, Any] = {"bench": "v29", "v29": str(args.v29), "cpu": cpu_name(), "machine": machine(),
                               "device": device, "torch_threads": threads, "where": where, "checks": checks,
                               "config": {p: models[p][1].to_dict() for p in parts}, "seed": args.seed}

    if "train" in parts:
        print(f"torch training steps ({', '.join(precisions)}), round-robin", flush=True)
        v29_cfg, cfg, state = models["train"]
        results, after = time_torch_training(v29, v29_cfg, cfg, state, batches, args, device, precisions, backends)
        results += jax_out.get("train", [])
        step_checks = {}
        if "v29" in after:
            for impl in ("dba torch", "dba torch compiled"):
                if impl in after:
                    step_checks[impl] = step_agreement(after["v29"], after[impl])
            if jax_out.get("after_first") is not None:
                step_checks["dba JAX"] = step_agreement(after["v29"], jax_out["after_first"])
        order = {"v29": 0, "dba torch": 1, "dba torch compiled": 2, "dba JAX": 3}
        results.sort(key=lambda r: (order[r["impl"]], precisions.index(r["precision"])))
        rows = train_summary(results, b * t)
        print_table(f"Training step, config A (null_attn={cfg.null_attn}, decoupled_scale={cfg.decoupled_scale}), "
                    f"batch {b} x seq {t}, Lion lr 3e-4 wd 0.1 clip 1.0 (dba: {args.optimizer}); median of "
                    f"{args.steps} steps after {args.warmup} warm-up",
                    ["impl", "precision", "tokens/s", "ms/step", "best ms", "vs v29 same prec.", "vs v29 fastest",
                     "first step s", "loss step 1"], rows)
        print("first step s: the first call (JAX: compile + first step); fp32 = fp32 params; amp = fp32 params, "
              "bf16 autocast/compute; bf16 = bf16 params and compute")
        disturbed = [f"{r['impl']} {r['precision']}" for r in results if max(r["step_s"]) > 1.5 * min(r["step_s"])]
        if disturbed:
            print(f"disturbed (slowest step > 1.5x the fastest; other load? rerun): {', '.join(disturbed)}")
        for impl, a in step_checks.items():
            print(f"after one fp32 step, {impl} vs v29: {a['elements'] - a['within']:,} of {a['elements']:,} parameter "
                  f"elements differ by more than {a['atol']:g} (max |diff| {a['max_abs']:.2e}; one Lion step moves "
                  "an element by lr = 3e-4, so 6e-4 is a sign taken the other way)")
        payload["train"] = {"batch_size": b, "seq_len": t, "optimizer_dba": args.optimizer, "warmup": args.warmup,
                            "steps": args.steps, "results": results, "after_one_step": step_checks}

    if "generate" in parts:
        print("torch generation: v29 and torch_ref alternating", flush=True)
        v29_cfg, cfg, state = models["generate"]
        results = time_torch_generation(nets["generate"], cfg, state, prompt, args, device, backends)
        if "generate" in jax_out:
            results.append(jax_out["generate"])
        rows = generate_summary(results, args.new_tokens, args.prompt_len)
        print_table(f"Generation, config A (null_attn={cfg.null_attn}), {args.prompt_len}-token prompt + "
                    f"{args.new_tokens} new tokens, greedy, batch 1, q4_0 cache (k_sem q4_0, k_geo q8_0, v q4_0; "
                    f"window {args.residual}), decode block {args.decode_block}; median of {args.repeats}",
                    ["impl", "prefill s", "prefill tok/s", "decode tok/s", "tok/s incl. prefill", "prefill vs v29",
                     "decode vs v29", "incl. prefill vs v29", "tokens = v29", "warm-up s"], rows)
        print("tokens = v29: new tokens equal to v29's (the leading run that agrees); greedy tokens can part at a "
              "near-tie of the logits, since the attention sums in another order. v29's prefill unembeds every "
              "prompt position (dba's only the last), as its generate does.")
        payload["generate"] = {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                               "decode_block": args.decode_block, "residual": args.residual, "repeats": args.repeats,
                               "results": results}

    load_end = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"\nCPU: {cpu_name()} ({os.cpu_count()} cores); " + "; ".join(f"{k}: {v}" for k, v in where.items()))
    if load_start and load_end:
        print(f"load average: {load_start[0]:.2f} at the start, {load_end[0]:.2f} {load_end[1]:.2f} "
              f"{load_end[2]:.2f} at the end (other processes skew timings)")
    payload["load"] = {"start": load_start, "end": load_end}
    write_json(args.json, payload)
    return 0


def main(argv: list[str] | None = None) -> int:
    return bench_main("bench.v29", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
