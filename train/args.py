"""`dba train` flags (v29's names) and their conversion, once, into a typed `RunConfig`.

Every flag is declared with `default=SUPPRESS`, so the parsed namespace holds exactly the flags
the user typed. Knowing what was typed lets `--resume` take a run's saved flags and override only
what is given again, and lets the out dir default depend on whether anything but presentation
flags was given. `run_config(explicit, base)` then fills in the defaults below and builds the
frozen, validated dataclasses of train/config.py; from there on nothing reads a flags dict.

The defaults train the no-argument recipe: a small decoupled model (d_model 128, 4 layers,
4 heads, sem/geo/attn 32/64/128) on the default corpus (CPython's pydoc topics through the byte
tokenizer, vocab 256), seq 128, batch 16, 600 AdamW steps at a constant lr 2e-3,
which finishes on a 2-core CPU in a few minutes with the validation loss falling from ~5.5.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Mapping

from dba.config import (
    ATTN_MODES,
    DECOUPLED_SCALES,
    EXPERIMENTS,
    MLP_KINDS,
    PAPER_ALL,
    SIZE_TRAINING,
    SIZES,
)
from dba.data import DATA_FORMATS, TOKEN_DTYPES
from dba.kvspec import KV_KINDS, KVPolicy
from dba.optimizers import OPTIMIZERS, SCHEDULES
from train.config import BACKENDS, GROUP_TYPES, AnalysisConfig, RunConfig


@dataclass(frozen=True)
class Flag:
    name: str  # dest, v29's attribute name; the flag is --name-with-dashes
    kind: str  # int | float | str | bool (store_true)
    default: Any = None
    help: str = ""
    choices: tuple | None = None
    group: str = "run"  # the RunConfig group that holds it ("kv": the cache policy; "recorded": v29-only)
    field: str | None = None  # the field in that group (default: the flag's name)

    @property
    def attr(self) -> str:
        return self.field or self.name


def _f(name, kind, default=None, help="", choices=None, group="run", field=None):
    return Flag(name, kind, default, help, tuple(choices) if choices else None, group, field)


FLAGS: list[Flag] = [
    # -- run
    _f("mode", "str", "train", "v29's mode flag; only 'train' is valid for `dba train`", ("train", "sample")),
    _f("backend", "str", "auto", "framework that trains: jax (Flax NNX, Optax, Orbax; cpu/gpu/tpu, meshes) or torch "
       "(torch_ref; cpu, cuda, mps). auto: jax, or torch when --device is mps, cuda:N, or cuda/gpu without a JAX "
       "GPU backend", BACKENDS),
    _f("device", "str", "auto", "where to train: auto, cpu, gpu, cuda, cuda:N (torch), tpu (jax), mps (torch)"),
    _f("print_config", "bool", False, "print the resolved model config and args as JSON and exit"),
    _f("seed", "int", 1337, "seed for init, batches and dropout"),
    # -- data
    _f("data", "str", None, "token file (.npy / .bin / .pt / .txt); default: the built-in corpus", group="data",
       field="path"),
    _f("data_format", "str", "auto", "npy, bin (raw --data-dtype ids), pt (a torch.save'd integer tensor), text "
       "(v29: whitespace-separated integer ids), utf8 (text to tokenize with --tokenizer); auto: by extension, a "
       ".txt holding only digits and whitespace is ids (text), any other .txt is utf8", DATA_FORMATS, group="data",
       field="format"),
    _f("data_dtype", "str", "uint16", "dtype of a raw .bin token file", TOKEN_DTYPES, group="data", field="dtype"),
    _f("tokenizer", "str", None, "byte, tiktoken:gpt2 (alias gpt2, tiktoken), or the path of a Hugging Face "
       "tokenizer.json (needs the tokenizers package to encode text). Text data is tokenized with it (default "
       "byte); with token-id data it is only recorded, so `dba sample --prompt TEXT` prints text. word (v29's "
       "default): accepted with token-id data, where it has no effect; refused for text", group="data"),
    _f("vocab_size", "int", None, "vocabulary size (default: the tokenizer's, else max id + 1)", group="data"),
    _f("val_frac", "float", 0.1, "fraction of the tokens held out (the tail) for validation", group="data"),
    # -- model
    _f("size", "str", None, "v29 size preset: the model dims and, unless typed, --steps, --batch-size and "
       "--train-seq-len (tiny 6000/16/1024, small 10000/8/1024, medium 15000/4/2048, large 20000/2/2048, "
       "1b 20000/1/2048)", tuple(SIZES), group="model"),
    _f("exp", "str", None, "v29 experiment preset: paper_baseline, paper_bottleneck, paper_decoupled, paper_gqa; "
       f"{PAPER_ALL} trains those four one after another (one run directory each); train_decoupled_fast = "
       "decoupled + tie_qk + rope, no null attention (the model part only: unlike some v29 versions it sets no "
       "precision, optimizer or schedule flags). Without --out-dir the run is named (as in v29) "
       "<run-root>/[<size>_]<exp without 'paper_'>[_<run-tag>]", (*EXPERIMENTS, PAPER_ALL), group="model"),
    _f("d_model", "int", None, "model width (default 128; d_ff/embed_dim follow unless given)", group="model"),
    _f("layers", "int", None, "number of blocks (default 4)", group="model"),
    _f("n_head", "int", None, "attention heads (default 4)", group="model"),
    _f("d_ff", "int", None, "MLP width (default 4*d_model)", group="model"),
    _f("embed_dim", "int", None, "lexical bottleneck width (default d_model)", group="model"),
    _f("attn_mode", "str", None, "attention kind (default decoupled)", ATTN_MODES, group="model"),
    _f("attn_dim", "int", None, "V width (and Q/K for bottleneck/gqa), summed over heads", group="model"),
    _f("sem_dim", "int", None, "decoupled semantic Q/K width", group="model"),
    _f("geo_dim", "int", None, "decoupled geometric (RoPE) Q/K width", group="model"),
    _f("kv_head", "int", None, "K/V heads for gqa", group="model"),
    _f("block", "int", None, "context length (block_size); grown to the longest trained length", group="model"),
    _f("rope_base", "float", None, "RoPE base", group="model"),
    _f("rope", "bool", False, "use RoPE (the default)", group="model"),
    _f("no_rope", "bool", False, "disable RoPE", group="model"),
    _f("tie_qk", "bool", False, "K projection is the Q projection", group="model"),
    _f("no_tie_qk", "bool", False, "untie Q and K (overrides a preset)", group="model"),
    _f("null_attn", "bool", False, "learned null key/value", group="model"),
    _f("no_null_attn", "bool", False, "no null attention (overrides a preset)", group="model"),
    _f("no_learned_temp", "bool", False, "disable the per-head learned temperature", group="model"),
    _f("mlp", "str", None, "MLP kind", MLP_KINDS, group="model"),
    _f("dropout", "float", None, "dropout rate", group="model"),
    _f("decoupled_scale", "str", None, "decoupled score scaling (SPEC §3)", DECOUPLED_SCALES, group="model"),
    # -- steps and batches
    _f("steps", "int", 600, "optimizer steps (--size sets its own)", group="steps"),
    _f("batch_size", "int", 16, "micro-batch size (sequences; --size sets its own)", group="steps"),
    _f("grad_accum", "int", 1, "micro-batches per optimizer step", group="steps"),
    _f("train_seq_len", "int", 128, "training sequence length (without --seq-schedule; --size: its context)",
       group="steps"),
    _f("seq_schedule", "str", None, "sequence curriculum 'LEN@STEP,...', e.g. '256@0,512@500'", group="steps"),
    # -- optimisation
    _f("optimizer", "str", "adamw", "optimizer", OPTIMIZERS, group="optim", field="name"),
    _f("lr", "float", 2e-3, "peak learning rate", group="optim"),
    _f("weight_decay", "float", 0.1, "decoupled weight decay (p *= 1 - lr*wd)", group="optim"),
    _f("wd_exempt_1d", "bool", False, "no decay for embeddings and 1-D tensors", group="optim"),
    _f("adam_betas", "str", "0.9,0.95", "AdamW betas 'b1,b2'", group="optim"),
    _f("adam_eps", "float", 1e-8, "AdamW epsilon", group="optim"),
    _f("lion_betas", "str", "0.9,0.99", "Lion betas 'b1,b2'", group="optim"),
    _f("grad_clip", "float", 1.0, "global-norm gradient clip (0 = off)", group="optim"),
    _f("lr_schedule", "str", "constant", "learning-rate schedule", SCHEDULES, group="optim"),
    _f("warmup_steps", "int", 0, "linear warmup steps", group="optim"),
    _f("min_lr", "float", 0.0, "final learning rate of the cosine schedule", group="optim"),
    _f("skip_nonfinite", "int", 0, "skip up to N steps whose loss or gradient norm is not finite (their update is "
       "not applied; each is logged) and stop at the next; 0 = stop at the first, keeping the last good checkpoint",
       group="optim"),
    # -- precision
    _f("param_dtype", "str", "fp32", "parameter dtype (fp16 is refused: use bf16, or --amp --amp-dtype fp16)",
       ("fp32", "bf16", "fp16"), group="precision"),
    _f("amp", "bool", False, "mixed precision: matmuls in --amp-dtype (softmax/logits/loss stay fp32)", group="precision"),
    _f("amp_dtype", "str", "bf16", "compute dtype under --amp", ("bf16", "fp16"), group="precision"),
    _f("grad_checkpoint", "bool", False, "rematerialise each block in the backward pass", group="precision"),
    _f("matmul_precision", "str", "high", "fp32 matmul precision (v29's torch knob; 'medium' = bf16 passes on "
       "accelerators)", ("highest", "high", "medium"), group="precision"),
    # -- eval
    _f("eval_every", "int", 100, "evaluate every N steps (0 = only at the end)", group="eval", field="every"),
    _f("eval_iters", "int", 10, "batches per evaluation", group="eval", field="iters"),
    _f("eval_seq_len", "int", 0, "evaluation sequence length (0 = the current training length)", group="eval",
       field="seq_len"),
    # -- checkpoints and run dir
    _f("save_every", "int", 0, "save the 'last' checkpoint every N steps (0 = at the end only)", group="ckpt"),
    _f("resume", "bool", False, "continue the run in the out dir from its last checkpoint", group="ckpt"),
    _f("overwrite", "bool", False, "replace a run already in the out dir", group="ckpt"),
    _f("ckpt", "str", None, "initialise weights from a v29 .pt, an export or a run dir", group="ckpt"),
    _f("out_dir", "str", None, "run directory (default <run-root>/<name>)", group="ckpt"),
    _f("run_root", "str", "runs", "parent of default run directories", group="ckpt"),
    _f("run_tag", "str", None, "with --exp (v29): appended to the name [<size>_]<exp>_<tag>; otherwise the run "
       "name (default: 'default' for the plain recipe, else dba-<attn_mode>-<time>)", group="ckpt"),
    _f("save_optim", "bool", False, "v29 saved the optimizer state only with this flag; dba always saves it "
       "(every checkpoint can be resumed)", group="recorded"),
    # -- devices and hosts (train/sharding.py, train/distributed.py); not inherited by --resume
    _f("mesh", "str", None, "device mesh 'data=N,fsdp=M' over all devices: the batch is split over both axes, "
       "parameters and optimizer state over fsdp; one size may be -1 (the rest). Default: one device",
       group="distributed"),
    _f("coordinator", "str", None, "multi-host: HOST:PORT of process 0 (with --num-processes, --process-id; "
       "Slurm/Open MPI/TPU pods are detected without them)", group="distributed"),
    _f("num_processes", "int", None, "multi-host: number of processes (one per host)", group="distributed"),
    _f("process_id", "int", None, "multi-host: this process's index in [0, --num-processes)", group="distributed"),
    # -- display
    _f("live", "str", "auto", "progress display", ("auto", "rich", "basic", "off"), group="display"),
    _f("live_update_every", "int", 1, "update the live display at most every N steps", group="display",
       field="update_every"),
    _f("log_every", "int", 10, "log a train event (and fetch the loss) every N steps", group="display"),
    # -- instrumentation (train/analysis.py)
    _f("instrument", "str", "off", "attention analysis: basic = routing means; medium = + ranks and matrices "
       "in analysis.h5; full = + singular values and per-layer values", AnalysisConfig.LEVELS, group="analysis"),
    _f("analysis_every", "int", None, "run the analysis every N steps; 0 = no analysis (as in v29); default: at "
       "every eval", group="analysis", field="every_given"),
    _f("analysis_heads", "str", "0", "heads to analyse: '0,3', negative from the end, or 'all'", group="analysis",
       field="heads"),
    _f("analysis_layers", "str", "0,-1", "layers to analyse: '0,-1', negative from the end, or 'all'",
       group="analysis", field="layers"),
    _f("analysis_local_window", "int", 32, "keys counted as local (self included)", group="analysis",
       field="local_window"),
    _f("analysis_max_tokens", "int", 256, "length of the held-out sequence analysed", group="analysis",
       field="max_tokens"),
    _f("analysis_save_scores", "bool", False, "also store the sem/geo score matrices in analysis.h5",
       group="analysis", field="save_scores"),
    _f("analysis_topk", "int", 8, "k of the top-k attention mass", group="analysis", field="topk"),
    _f("live_plot", "bool", False, "redraw analysis.png at every log step too (default: at evals and the end)",
       group="analysis"),
    _f("tb", "bool", False, "write TensorBoard scalars to <out>/tb (needs tensorboardX: pip install 'dba[tb]')",
       group="analysis"),
    # -- KV cache policy: the summary's KV memory section (sampling takes the same flags)
    _f("kv_cache", "str", "fp16", "KV cache kind for the memory report", KV_KINDS, group="kv", field="kind"),
    _f("kv_cache_k", "str", None, "", KV_KINDS, group="kv", field="k"),
    _f("kv_cache_v", "str", None, "", KV_KINDS, group="kv", field="v"),
    _f("kv_cache_k_sem", "str", None, "", KV_KINDS, group="kv", field="k_sem"),
    _f("kv_cache_k_geo", "str", None, "", KV_KINDS, group="kv", field="k_geo"),
    _f("kv_qblock", "int", 32, "", group="kv", field="qblock"),
    _f("kv_qblock_k", "int", None, "", group="kv", field="qblock_k"),
    _f("kv_qblock_v", "int", None, "", group="kv", field="qblock_v"),
    _f("kv_qblock_k_sem", "int", None, "", group="kv", field="qblock_k_sem"),
    _f("kv_qblock_k_geo", "int", None, "", group="kv", field="qblock_k_geo"),
    _f("kv_residual", "int", 128, "", group="kv", field="residual"),
    _f("kv_decode_block", "int", 1024, "", group="recorded"),
    _f("kv_fused", "str", "auto", "", group="recorded"),
    # -- accepted for v29 command lines, recorded in meta, not acted on here
    _f("compile", "bool", False, "PyTorch trainer: torch.compile the step (not on mps; falls back to eager, saying "
       "why). JAX always compiles the step", group="recorded"),
    _f("compile_mode", "str", "default", "torch.compile mode for --compile (default, reduce-overhead, "
       "max-autotune)", group="recorded"),
    _f("sync_timing", "bool", False, "", group="recorded"),
    _f("opt_foreach", "bool", False, "", group="recorded"),
    _f("opt_fused", "bool", False, "", group="recorded"),
    _f("max_new_tokens", "int", 50, "", group="recorded"),
    _f("prompt_tokens", "str", "0", "", group="recorded"),
    _f("temperature", "float", 1.0, "", group="recorded"),
    _f("top_k", "int", None, "", group="recorded"),
]

# v29's self-optimisation knobs (decode-time autotuning): accepted so v29 command lines parse.
_SELF_OPT = [
    ("self_opt", "str", "none"), ("self_opt_block_n", "str", "128"), ("self_opt_cache", "str", None),
    ("self_opt_calib_decode", "int", 32), ("self_opt_calib_prefill", "int", 128),
    ("self_opt_calib_tokens", "str", None), ("self_opt_decode_blocks", "str", "256,512,1024,2048"),
    ("self_opt_hysteresis", "float", 0.03), ("self_opt_interval", "int", 256), ("self_opt_iters", "int", 3),
    ("self_opt_k_geo_kinds", "str", "q8_0,q4_0,fp16"), ("self_opt_k_sem_kinds", "str", "q4_0,nf4,q8_0,fp16"),
    ("self_opt_mem_budget_mb", "float", None), ("self_opt_mem_overhead_frac", "float", 0.1),
    ("self_opt_policy_hysteresis", "float", 0.02), ("self_opt_policy_iters", "int", 3),
    ("self_opt_policy_prefix_len", "int", None), ("self_opt_policy_quality", "bool", False),
    ("self_opt_policy_warmup", "int", 1), ("self_opt_prefer_low_mem_within", "float", 0.02),
    ("self_opt_qblocks", "str", "16,32,64"), ("self_opt_quality_delta_nll_tol", "float", 0.02),
    ("self_opt_quality_kl", "bool", False), ("self_opt_quality_kl_tol", "float", None),
    ("self_opt_quality_ppl_ratio_tol", "float", 1.02), ("self_opt_quality_tol", "float", 0.5),
    ("self_opt_residuals", "str", "0,32,64,128"), ("self_opt_scope", "str", "all"),
    ("self_opt_stages", "str", "2,3"), ("self_opt_v_kinds", "str", "q4_0,q8_0,fp16"),
    ("self_opt_verbose", "bool", False), ("self_opt_verify", "bool", False),
    ("self_opt_verify_tol", "float", 0.005), ("self_opt_warmup", "int", 1), ("self_opt_warps", "str", "4,8"),
]
FLAGS += [_f(n, k, d, "", group="recorded") for n, k, d in _SELF_OPT]

FLAG_BY_NAME = {f.name: f for f in FLAGS}
DEFAULTS = {f.name: f.default for f in FLAGS}
FLAG_FIELDS = {f.name: (f.group, f.attr) for f in FLAGS}
MODEL_FLAGS = tuple(f.name for f in FLAGS if f.group == "model")
# Flags that change nothing about what is trained: with only these, the run is "the default".
PRESENTATION_FLAGS = frozenset({
    "live", "live_update_every", "log_every", "device", "backend", "overwrite", "resume", "run_root", "print_config",
    "mode", "compile", "matmul_precision",
    # the analysis and the mesh and hosts change how a run is observed or computed, not what it trains
    *(f.name for f in FLAGS if f.group in ("analysis", "distributed"))})
# Flags a resumed run may not change: they define the model, the data or the optimizer state.
FIXED_ON_RESUME = frozenset(MODEL_FLAGS) | {"data", "data_format", "data_dtype", "tokenizer", "vocab_size",
                                            "val_frac", "seed", "optimizer", "param_dtype", "batch_size",
                                            "grad_accum", "ckpt"}
# This invocation's switches and hardware: never taken from the run being resumed.
NOT_INHERITED = frozenset({"resume", "overwrite", "print_config", "device", "backend", "live", "mode",
                           "mesh", "coordinator", "num_processes", "process_id"})

_GROUP_TITLES = {
    "run": "run", "data": "data", "model": "model (v29 flags)", "steps": "steps and batches",
    "optim": "optimisation", "precision": "precision", "eval": "evaluation", "ckpt": "checkpoints and run directory",
    "distributed": "devices and hosts (mesh, multi-host)", "display": "display",
    "analysis": "instrumentation and reports", "kv": "KV-cache policy (for the summary's memory section)",
    "recorded": "accepted v29 flags (recorded; --compile and --compile-mode act in the PyTorch trainer)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    groups: dict[str, Any] = {}
    for f in FLAGS:
        g = groups.get(f.group)
        if g is None:
            g = groups[f.group] = parser.add_argument_group(_GROUP_TITLES[f.group])
        opt = "--" + f.name.replace("_", "-")
        help_ = f.help or "v29 flag, recorded only"
        if f.kind == "bool":
            g.add_argument(opt, dest=f.name, action="store_true", default=argparse.SUPPRESS, help=help_)
            continue
        typ = {"int": int, "float": float, "str": str}[f.kind]
        default_txt = "" if f.default is None else f" (default {f.default})"
        g.add_argument(opt, dest=f.name, type=typ, choices=f.choices, default=argparse.SUPPRESS,
                       metavar=None if f.choices else f.kind.upper(), help=help_ + default_txt)


def explicit_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The flags the user typed (everything else is absent thanks to SUPPRESS)."""
    return {k: v for k, v in vars(args).items() if k in FLAG_BY_NAME}


def run_config(explicit: Mapping[str, Any], base: Mapping[str, Any] | None = None,
               implied: Mapping[str, Any] | None = None) -> RunConfig:
    """The typed configuration: defaults, then the steps, batch and sequence length of a --size
    preset, then `base` (a resumed run's saved flags), then values `implied` by the invocation
    (not typed), then what was typed. Every value is checked here
    (one-line UserErrors naming the flag)."""
    flags = dict(DEFAULTS)
    size = explicit.get("size") or (base or {}).get("size")
    if size in SIZE_TRAINING:  # v29: a size preset also sets steps, batch and sequence length
        flags.update(SIZE_TRAINING[size])
    for layer in (base, implied):
        flags.update({k: v for k, v in (layer or {}).items() if k in FLAG_BY_NAME})
    flags.update({k: v for k, v in explicit.items() if k in FLAG_BY_NAME})
    by_group: dict[str, dict[str, Any]] = {g: {} for g in (*GROUP_TYPES, "kv", "recorded")}
    for name, value in flags.items():
        group, field = FLAG_FIELDS[name]
        by_group[group][field if group != "recorded" else name] = value
    groups = {g: cls(**by_group[g]) for g, cls in GROUP_TYPES.items()}
    kv = KVPolicy.from_dict({k: v for k, v in by_group["kv"].items() if v is not None})
    return RunConfig(**groups, kv=kv, recorded=by_group["recorded"], explicit=frozenset(explicit),
                     flag_fields=FLAG_FIELDS)


def saved_flags(flags: Mapping[str, Any]) -> dict[str, Any]:
    """A run's recorded flags in today's meanings. Runs recorded before v29's meanings were
    restored (their flags lack `save_optim`) read `--data-format text` as text to tokenize (now
    `utf8`) and `--analysis-every 0` as "at every evaluation" (now: not given; 0 is off)."""
    out = dict(flags)
    if out and "save_optim" not in out:
        if out.get("data_format") == "text":
            out["data_format"] = "utf8"
        if out.get("analysis_every") == 0:
            out["analysis_every"] = None
    return out
