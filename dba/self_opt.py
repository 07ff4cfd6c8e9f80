"""v29's self-optimizing cache policy (`--self-opt`), measured by quality first, then speed, then
memory. Framework-free: the backends supply how to score a policy on calibration tokens (the real
decode path, as `dba eval`) and how long a decode step takes.

The search, for a target context and a memory budget:
1. Candidates: every combination of the per-stream kinds (`--self-opt-k-sem-kinds`,
   `--self-opt-k-geo-kinds`, `--self-opt-v-kinds`; a non-decoupled model's `k` takes the k-geo
   kinds: its keys are rotated like the geometric ones), residual windows and block sizes.
   Those whose cache at the target context exceeds the budget (less `--self-opt-mem-overhead-frac`
   for temporaries) are dropped.
2. Screening: each stream alone at each kind (the others fp16) on the calibration tokens. A kind
   whose error alone already breaks the guard cannot pass with the others quantized as well, so
   its candidates are dropped (the errors of different streams add up, they do not cancel).
3. Quality: the remaining candidates, fewest bytes first, are scored jointly against the fp32
   cache (`delta_nll`, `kl`, ppl ratio) until `--self-opt-policy-iters` x 4 have passed or all are
   tried; a candidate passes when all its figures are within the tolerances.
4. Speed: the passing ones are timed (decode steps with the cache filled to the target context),
   the fastest wins; within `--self-opt-prefer-low-mem-within` of it, the smallest cache wins.
   With scope `decode` or `all` the decode block is chosen the same way.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dba.errors import UserError
from dba.flags import Flag, field_default, values
from dba.kvspec import KV_KINDS, KVPolicy, kv_bytes, policy_label
from dba.units import human_bytes

MODES = ("none", "startup", "online")
MAX_JOINT_SCORES = 8  # x --self-opt-policy-iters: joint quality scores at most, fewest bytes first
SCOPES = ("cache", "decode", "all")
# (tokens (B, L), prompt length, policy) -> score arrays (dba.evaluation / */evaluate.py)
Scorer = Callable[[np.ndarray, int, KVPolicy], dict[str, np.ndarray]]
# (policy, context, decode steps, decode block) -> seconds per decode step
Timer = Callable[[KVPolicy, int, int, int], float]


@dataclass(frozen=True)
class SelfOptOptions:
    """v29's `--self-opt-*` knobs that this search uses (names without the prefix)."""

    mode: str = "none"
    scope: str = "all"
    mem_budget_mb: float | None = None
    mem_overhead_frac: float = 0.1
    k_sem_kinds: tuple[str, ...] = ("q4_0", "nf4", "q8_0", "fp16")
    k_geo_kinds: tuple[str, ...] = ("q8_0", "q4_0", "fp16")
    v_kinds: tuple[str, ...] = ("q4_0", "q8_0", "fp16")
    residuals: tuple[int, ...] = (0, 32, 64, 128)
    qblocks: tuple[int, ...] = (16, 32, 64)
    decode_blocks: tuple[int, ...] = (256, 512, 1024, 2048)
    calib_prefill: int = 128
    calib_decode: int = 32
    quality_delta_nll_tol: float = 0.02
    quality_kl_tol: float | None = None
    quality_ppl_ratio_tol: float = 1.02
    policy_iters: int = 3
    prefer_low_mem_within: float = 0.02
    policy_hysteresis: float = 0.02
    interval: int = 256
    iters: int = 3
    fallback: bool = False
    verbose: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UserError(f"--self-opt {self.mode!r}: choose {', '.join(MODES)}")
        if self.scope not in SCOPES:
            raise UserError(f"--self-opt-scope {self.scope!r}: choose {', '.join(SCOPES)}")
        for name in ("k_sem_kinds", "k_geo_kinds", "v_kinds"):
            bad = [k for k in getattr(self, name) if k not in KV_KINDS]
            if bad or not getattr(self, name):
                raise UserError(f"--self-opt-{name.replace('_', '-')}: unknown kind(s) {bad or '(none)'}; "
                                f"choose from {'|'.join(KV_KINDS)}")
        for name in ("residuals", "qblocks", "decode_blocks"):
            vals = getattr(self, name)
            if not vals or any(v < (0 if name == "residuals" else 1) for v in vals):
                raise UserError(f"--self-opt-{name.replace('_', '-')}: expected positive integers, got {list(vals)}")
        if self.mem_budget_mb is not None and self.mem_budget_mb <= 0:
            raise UserError(f"--self-opt-mem-budget-mb must be > 0, got {self.mem_budget_mb}")
        if not 0.0 <= self.mem_overhead_frac < 1.0:
            raise UserError(f"--self-opt-mem-overhead-frac must be in [0, 1), got {self.mem_overhead_frac}")
        if self.calib_prefill < 1 or self.calib_decode < 1 or self.interval < 1 or self.iters < 1:
            raise UserError("--self-opt-calib-prefill/-calib-decode/-interval/-iters must be >= 1")

    @property
    def budget_bytes(self) -> int | None:
        if self.mem_budget_mb is None:
            return None
        return int(self.mem_budget_mb * 2**20 * (1.0 - self.mem_overhead_frac))


def _opt(field: str, help: str, kind: str | None = None, choices: tuple | None = None) -> Flag:
    """The flag `--self-opt-<field>` (`--self-opt` for mode) filling SelfOptOptions.<field>."""
    name = "self_opt" if field == "mode" else f"self_opt_{field}"
    default = field_default(SelfOptOptions, field)
    if kind is None:
        kind = ("bool" if isinstance(default, bool) else "int" if isinstance(default, int) else
                "float" if isinstance(default, float) else "str")
    return Flag(name, kind, default, help, choices, "self_opt", field)


# v29's --self-opt flags (dba sample, dba eval; recorded by dba train): the one declaration. Lists
# (kinds, windows, blocks) are typed comma-separated.
SELF_OPT_FLAGS: tuple[Flag, ...] = (
    _opt("mode", "startup: decide once for the target context; online: decide for each cache capacity as "
         "generation grows (doubling), switching with hysteresis", choices=MODES),
    _opt("scope", "cache: the policy; decode: the decode block; all: both", choices=SCOPES),
    _opt("mem_budget_mb", "KV-cache budget at the target context (MiB)", kind="float"),
    _opt("mem_overhead_frac", "share of the budget kept for temporaries"),
    _opt("quality_delta_nll_tol", "largest delta NLL vs the fp32 cache"),
    _opt("quality_kl_tol", "largest mean KL vs the fp32 cache (off unless given)", kind="float"),
    _opt("quality_ppl_ratio_tol", "largest ppl ratio vs the fp32 cache"),
    _opt("calib_prefill", "calibration prompt tokens"),
    _opt("calib_decode", "calibration decoded tokens"),
    _opt("k_sem_kinds", "kinds tried for the k_sem stream"),
    _opt("k_geo_kinds", "kinds tried for the k_geo stream (also a non-decoupled model's k)"),
    _opt("v_kinds", "kinds tried for the v stream"),
    _opt("residuals", "fp16 windows tried"),
    _opt("qblocks", "quantization blocks tried"),
    _opt("decode_blocks", "decode blocks tried"),
    _opt("policy_iters", "search effort: up to 4x this many passing and 8x this many scored candidates"),
    _opt("prefer_low_mem_within", "within this speed fraction of the fastest, the smallest cache wins"),
    _opt("policy_hysteresis", "online: switch only to a choice faster by more than this fraction (or when over "
         "budget)"),
    _opt("interval", "online: new tokens in the first cache bucket (capacities then double)"),
    _opt("iters", "timed runs per candidate (the best counts)"),
    _opt("fallback", "when nothing fits or passes, warn and use the base policy instead of failing"),
    _opt("verbose", "print every candidate tried"),
)
# Flags of the same group that are not search options: where the calibration tokens and the plan
# come from, and v29 switches that are always on here.
SELF_OPT_IO_FLAGS: tuple[Flag, ...] = (
    Flag("self_opt_calib_tokens", "str", None, "calibration token file (default: the prompt when long enough, "
         "else the run's own data)", group="self_opt_io"),
    Flag("self_opt_cache", "str", None, "plan file: a decision is reused when model, budget, context and knobs "
         "match", group="self_opt_io"),
    Flag("self_opt_policy_quality", "bool", False, "accepted for v29 command lines: the quality guard is always on "
         "here", group="self_opt_io"),
    Flag("self_opt_quality_kl", "bool", False, "accepted for v29 command lines: the KL is always measured; give "
         "--self-opt-quality-kl-tol to guard it", group="self_opt_io"),
)
# v29 knobs accepted so v29 command lines run as written, with what they mean here (no effect).
SELF_OPT_V29_ONLY: tuple[Flag, ...] = tuple(
    Flag(name, kind, default, f"v29 flag, no effect: {why}", group="v29_only") for name, kind, default, why in (
        ("self_opt_block_n", "str", "128", "v29's Triton tile; the decode block is --self-opt-decode-blocks here"),
        ("self_opt_hysteresis", "float", 0.03, "v29's decode-plan hysteresis; here see --self-opt-policy-hysteresis"),
        ("self_opt_policy_prefix_len", "int", None, "v29's calibration prefix; here --self-opt-calib-prefill"),
        ("self_opt_policy_warmup", "int", 1, "untimed runs before timing: one compiling run here"),
        ("self_opt_quality_tol", "float", 0.5, "v29's legacy guard; here --self-opt-quality-delta-nll-tol"),
        ("self_opt_stages", "str", "2,3", "v29's search stages; here screening, quality, speed always"),
        ("self_opt_verify", "bool", False, "quality is always measured through the real decode path here"),
        ("self_opt_verify_tol", "float", 0.005, "see --self-opt-quality-*"),
        ("self_opt_warmup", "int", 1, "untimed runs before timing: one compiling run here"),
        ("self_opt_warps", "str", "4,8", "v29's Triton warps; no effect here"),
    ))
ALL_SELF_OPT_FLAGS = SELF_OPT_FLAGS + SELF_OPT_IO_FLAGS + SELF_OPT_V29_ONLY


def options_from_flags(flags: dict[str, Any]) -> SelfOptOptions:
    """From v29's `self_opt*` flag values (argparse dests, or a run's recorded flags; missing or
    None = the field's default). Lists are comma-separated strings."""
    def ints(text: str, flag: str) -> tuple[int, ...]:
        try:
            return tuple(int(t) for t in str(text).split(",") if t.strip())
        except ValueError:
            raise UserError(f"{flag}: expected comma-separated integers, got {text!r}") from None

    def kinds(text: str) -> tuple[str, ...]:
        return tuple(t.strip() for t in str(text).split(",") if t.strip())

    given = dict(flags)
    fields = values(SELF_OPT_FLAGS, given)
    for f in SELF_OPT_FLAGS:
        if f.attr.endswith("_kinds"):
            fields[f.attr] = kinds(fields[f.attr])
        elif f.attr in ("residuals", "qblocks", "decode_blocks"):
            fields[f.attr] = ints(fields[f.attr], f.option)
    return SelfOptOptions(**fields)


@dataclass
class Candidate:
    policy: KVPolicy
    label: str
    bytes: int  # the cache at the target context, batch 1
    delta_nll: float | None = None
    kl: float | None = None
    ppl_ratio: float | None = None
    passed: bool | None = None
    step_s: float | None = None
    decode_block: int | None = None
    note: str = ""

    def figures(self) -> str:
        parts = [f"{human_bytes(self.bytes)} at the target context"]
        if self.delta_nll is not None:
            parts.append(f"delta_nll {self.delta_nll:+.4f}, KL {self.kl:.2e}, ppl x{self.ppl_ratio:.4f}")
        if self.step_s:
            parts.append(f"{1.0 / self.step_s:,.1f} tok/s")
        return ", ".join(parts)


@dataclass
class Decision:
    policy: KVPolicy
    label: str
    decode_block: int
    ctx: int
    bytes: int
    delta_nll: float | None
    kl: float | None
    tok_s: float | None
    tried: list[Candidate] = field(default_factory=list)
    from_cache: bool = False

    def line(self) -> str:
        q = (f"delta_nll {self.delta_nll:+.4f}, KL {self.kl:.2e}" if self.delta_nll is not None
             else "quality not measured")
        speed = f", {self.tok_s:,.1f} tok/s" if self.tok_s else ""
        src = " (from the plan cache)" if self.from_cache else ""
        return (f"self-opt{src}: {self.label}, decode block {self.decode_block}: {human_bytes(self.bytes)} at "
                f"{self.ctx} tokens, {q}{speed}")

    def to_json(self) -> dict[str, Any]:
        return {"policy": self.policy.to_dict(), "label": self.label, "decode_block": self.decode_block, "ctx": self.ctx,
                "bytes": self.bytes, "delta_nll": self.delta_nll, "kl": self.kl, "tok_s": self.tok_s}


def _stream_kinds(cfg: Any, o: SelfOptOptions) -> dict[str, tuple[str, ...]]:
    if cfg.attn_mode == "decoupled":
        return {"k_sem": o.k_sem_kinds, "k_geo": o.k_geo_kinds, "v": o.v_kinds}
    return {"k": o.k_geo_kinds, "v": o.v_kinds}


def candidates(cfg: Any, ctx: int, o: SelfOptOptions, batch: int = 1) -> list[Candidate]:
    """Every combination that fits the budget at `ctx` (a cache of `batch` rows), fewest bytes first."""
    streams = _stream_kinds(cfg, o)
    seen: dict[str, Candidate] = {}
    for kinds in itertools.product(*streams.values()):
        per = dict(zip(streams, kinds))
        quantized = any(k in ("q8_0", "q4_0", "nf4") for k in kinds)
        for residual, qblock in itertools.product(o.residuals if quantized else (0,), o.qblocks if quantized else (32,)):
            policy = KVPolicy(kind="fp16", residual=residual, qblock=qblock, **per)
            label = policy_label(policy, cfg)
            if label in seen:
                continue
            seen[label] = Candidate(policy, label, kv_bytes(cfg, ctx, batch, policy)["total_bytes"])
    out = sorted(seen.values(), key=lambda c: (c.bytes, c.label))
    budget = o.budget_bytes
    return out if budget is None else [c for c in out if c.bytes <= budget]


def _measure(c: Candidate, scores: dict[str, np.ndarray], o: SelfOptOptions) -> bool:
    c.delta_nll = float(np.mean(scores["nll"] - scores["ref_nll"]))
    c.kl = float(np.mean(scores["kl"]))
    c.ppl_ratio = math.exp(c.delta_nll)
    c.passed = (c.delta_nll <= o.quality_delta_nll_tol and c.ppl_ratio <= o.quality_ppl_ratio_tol
                and (o.quality_kl_tol is None or c.kl <= o.quality_kl_tol))
    return c.passed


def choose(cfg: Any, ctx: int, calib: np.ndarray, score: Scorer, time_step: Timer, o: SelfOptOptions,
           base: KVPolicy, base_decode_block: int = 1024, batch: int = 1) -> Decision:
    """The policy (and decode block) for a cache of `batch` x `ctx` tokens under `o`, measured on
    calib: tokens (B, prefill + decode + 1)."""
    n_prompt = min(o.calib_prefill, calib.shape[1] - 2)
    if o.scope == "decode":  # keep the base policy, choose only the decode block
        c = Candidate(base, policy_label(base, cfg), kv_bytes(cfg, ctx, batch, base)["total_bytes"])
        _measure(c, score(calib, n_prompt, base), o)
        return _with_decode_block(cfg, ctx, c, time_step, o, [c])
    pool = candidates(cfg, ctx, o, batch)
    if not pool:
        everything = candidates(cfg, ctx, SelfOptOptions(**{**asdict(o), "mem_budget_mb": None}), batch)
        cheapest = min(everything, key=lambda c: c.bytes)
        return _fail(f"no cache policy fits --self-opt-mem-budget-mb {o.mem_budget_mb:g} at {ctx} tokens "
                     f"(the smallest candidate, {cheapest.label}, needs {human_bytes(cheapest.bytes)})", o, base, cfg, ctx,
                     base_decode_block)
    tried = _screen_and_score(cfg, calib, n_prompt, score, o, pool)
    passing = [c for c in tried if c.passed]
    if not passing:
        best = min(tried, key=lambda c: c.delta_nll if c.delta_nll is not None else math.inf)
        return _fail(f"no cache policy within the budget passes the quality guard (delta_nll <= "
                     f"{o.quality_delta_nll_tol:g}, ppl ratio <= {o.quality_ppl_ratio_tol:g}"
                     + (f", KL <= {o.quality_kl_tol:g}" if o.quality_kl_tol is not None else "")
                     + f"); the best, {best.label}: {best.figures()}", o, base, cfg, ctx, base_decode_block)
    for c in passing:
        c.step_s = time_step(c.policy, ctx, o.calib_decode, base_decode_block)
    fastest = min(c.step_s for c in passing)
    close = [c for c in passing if c.step_s <= fastest * (1.0 + o.prefer_low_mem_within)]
    winner = min(close, key=lambda c: (c.bytes, c.step_s))
    if o.scope == "all":
        return _with_decode_block(cfg, ctx, winner, time_step, o, tried)
    return Decision(winner.policy, winner.label, base_decode_block, ctx, winner.bytes, winner.delta_nll, winner.kl,
                    1.0 / winner.step_s, tried)


def _screen_and_score(cfg, calib, n_prompt, score, o, pool) -> list[Candidate]:
    """Per-stream screening, then joint scores of the survivors, fewest bytes first."""
    bad: set[tuple[str, str]] = set()
    for stream, kinds in _stream_kinds(cfg, o).items():
        for kind in kinds:
            if kind in ("fp16", "fp32"):
                continue
            # the kind at its most accurate settings: if even that fails alone, no candidate with it passes
            alone = KVPolicy(kind="fp16", residual=max(o.residuals), qblock=min(o.qblocks), **{stream: kind})
            probe = Candidate(alone, policy_label(alone, cfg), 0)
            if not _measure(probe, score(calib, n_prompt, alone), o):
                bad.add((stream, kind))
    survivors = [c for c in pool if not any(c.policy.resolve(s, cfg.attn_mode)[0] == k for s, k in bad)]
    if not survivors:  # every candidate holds a kind that fails alone: report the gentlest one
        survivors = pool[-1:]
    tried, passed = [], 0
    for c in survivors[:MAX_JOINT_SCORES * o.policy_iters]:
        tried.append(c)
        passed += _measure(c, score(calib, n_prompt, c.policy), o)
        if passed >= 4 * o.policy_iters:
            break
    return tried


def _with_decode_block(cfg, ctx, c: Candidate, time_step: Timer, o: SelfOptOptions, tried) -> Decision:
    blocks = sorted({min(b, ctx) for b in o.decode_blocks})
    times = {b: time_step(c.policy, ctx, o.calib_decode, b) for b in blocks}
    best = min(times, key=times.get)
    return Decision(c.policy, c.label, best, ctx, c.bytes, c.delta_nll, c.kl, 1.0 / times[best], tried)


def _fail(message: str, o: SelfOptOptions, base: KVPolicy, cfg: Any, ctx: int, decode_block: int) -> Decision:
    if not o.fallback:
        raise UserError(message + "; raise the budget or the tolerances, or pass --self-opt-fallback", 1)
    import sys

    print(f"self-opt: warning: {message}; falling back to the base policy", file=sys.stderr)
    return Decision(base, policy_label(base, cfg), decode_block, ctx, kv_bytes(cfg, ctx, 1, base)["total_bytes"],
                    None, None, None)


# ---- the plan cache (--self-opt-cache FILE) ------------------------------------------------------

def plan_key(cfg: Any, source: str, ctx: int, o: SelfOptOptions) -> str:
    """What a saved decision depends on: the model (config and weights file), the budget, the
    context and the search's knobs."""
    try:
        st = os.stat(source)
        ident = [os.path.abspath(source), st.st_size, st.st_mtime_ns]
    except OSError:
        ident = [str(source)]
    knobs = {k: v for k, v in asdict(o).items() if k not in ("mode", "verbose", "fallback", "interval")}
    blob = json.dumps({"config": cfg.to_dict(), "weights": ident, "ctx": ctx, "search": knobs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_plan(path: str | Path, key: str) -> Decision | None:
    p = Path(path)
    if not p.is_file():
        return None
    try:
        entry = json.loads(p.read_text()).get(key)
    except (OSError, ValueError, AttributeError) as e:
        raise UserError(f"--self-opt-cache {str(p)!r}: not a plan file ({e})", 1) from None
    if not entry:
        return None
    return Decision(KVPolicy.from_dict(entry["policy"]), entry["label"], int(entry["decode_block"]), int(entry["ctx"]),
                    int(entry["bytes"]), entry.get("delta_nll"), entry.get("kl"), entry.get("tok_s"), from_cache=True)


def save_plan(path: str | Path, key: str, d: Decision) -> None:
    p = Path(path)
    plans: dict[str, Any] = {}
    if p.is_file():
        try:
            plans = json.loads(p.read_text())
        except ValueError:
            plans = {}
    plans[key] = d.to_json()
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(plans, indent=2))
    tmp.replace(p)


def candidates_table(d: Decision) -> list[str]:
    """--self-opt-verbose: one line per candidate tried."""
    lines = ["self-opt candidates (fewest bytes first):"]
    for c in d.tried:
        verdict = {True: "pass", False: "fail", None: "-"}[c.passed]
        lines.append(f"  {verdict:4s} {c.label}: {c.figures()}{' ' + c.note if c.note else ''}")
    return lines


class OnlinePlanner:
    """`--self-opt online`: the policy for each cache capacity an online generation grows through.
    It keeps the current policy while that still fits the budget at the new capacity and the new
    choice is not faster by more than `--self-opt-policy-hysteresis`."""

    def __init__(self, decide: Callable[[int], Decision], o: SelfOptOptions, cfg: Any, batch: int = 1,
                 say: Callable[[str], None] = print):
        self.decide, self.o, self.cfg, self.batch, self.say = decide, o, cfg, batch, say
        self.current: Decision | None = None
        self.switches = 0

    def __call__(self, capacity: int) -> tuple[KVPolicy, int]:
        new = self.decide(capacity)
        cur = self.current
        if cur is not None and cur.label != new.label:
            budget = self.o.budget_bytes
            fits = budget is None or kv_bytes(self.cfg, capacity, self.batch, cur.policy)["total_bytes"] <= budget
            cur_time = next((c.step_s for c in new.tried if c.label == cur.label and c.step_s), None)
            faster = cur_time is None or (new.tok_s or 0.0) > (1.0 + self.o.policy_hysteresis) / cur_time
            if fits and not faster:
                return cur.policy, cur.decode_block
        if cur is None or cur.label != new.label or cur.decode_block != new.decode_block:
            self.switches += cur is not None
            self.say(f"{new.line()} (cache capacity {capacity})")
        self.current = new
        return new.policy, new.decode_block
