"""`dba train` flags (v29's names) and their resolution into a ModelConfig and a run config.

Every flag is declared with `default=SUPPRESS`, so the parsed namespace holds exactly the flags
the user typed. `resolve_flags` adds the defaults below; knowing what was typed lets `--resume`
take a run's saved flags and override only what is given again, and lets the out dir default
depend on whether anything but presentation flags was given.

The defaults train the no-argument recipe: a small decoupled model (d_model 128, 4 layers,
4 heads, sem/geo/attn 32/64/128) on the default corpus (CPython's pydoc topics through the byte
tokenizer, vocab 256), seq 128, batch 16, 600 AdamW steps at lr 2e-3 (cosine to 1e-4, 50 warmup),
which finishes on a 2-core CPU in a few minutes with the validation loss falling from ~5.5.
"""

from __future__ import annotations

import argparse
import datetime
import os
from dataclasses import dataclass
from typing import Any

from dba.config import ATTN_MODES, DECOUPLED_SCALES, EXPERIMENTS, MLP_KINDS, SIZES, ConfigError, ModelConfig, size_fields
from dba.errors import UserError
from train.curriculum import SeqSchedule, parse_schedule

# The no-argument recipe's model (a v29 flag that is not given leaves these untouched).
DEFAULT_MODEL: dict[str, Any] = dict(
    d_model=128, n_layer=4, n_head=4, d_ff=512, embed_dim=128, attn_mode="decoupled",
    sem_dim=32, geo_dim=64, attn_dim=128, kv_head=None, rope=True, rope_base=10000.0,
    tie_qk=False, null_attn=False, learned_temp=True, mlp="swiglu", dropout=0.0,
    decoupled_scale="per_path",
)


@dataclass(frozen=True)
class Flag:
    name: str  # dest, v29's attribute name; the flag is --name-with-dashes
    kind: str  # int | float | str | bool (store_true)
    default: Any = None
    help: str = ""
    choices: tuple | None = None
    noop: bool = False  # accepted and recorded, not acted on by `dba train`
    group: str = "train"


def _f(name, kind, default=None, help="", choices=None, noop=False, group="train"):
    return Flag(name, kind, default, help, tuple(choices) if choices else None, noop, group)


FLAGS: list[Flag] = [
    # -- run
    _f("mode", "str", "train", "v29's mode flag; only 'train' is valid for `dba train`", ("train", "sample")),
    _f("device", "str", "auto", "JAX platform (mps: use the torch reference instead)",
       ("auto", "cpu", "gpu", "cuda", "tpu", "mps")),
    _f("print_config", "bool", False, "print the resolved model config and args as JSON and exit"),
    _f("seed", "int", 1337, "seed for init, batches and dropout"),
    # -- data
    _f("data", "str", None, "token file (.npy / .bin / text); default: the built-in corpus", group="data"),
    _f("data_format", "str", "auto", "token file format", ("auto", "npy", "bin", "text"), group="data"),
    _f("data_dtype", "str", "uint16", "dtype of a raw .bin token file", ("uint16", "uint32", "int32", "int64"), group="data"),
    _f("tokenizer", "str", "byte", "tokenizer for text data", ("byte", "tiktoken", "gpt2"), group="data"),
    _f("vocab_size", "int", None, "vocabulary size (default: the tokenizer's, else max id + 1)", group="data"),
    _f("val_frac", "float", 0.1, "fraction of the tokens held out (the tail) for validation", group="data"),
    # -- model
    _f("size", "str", None, "v29 size preset", tuple(SIZES), group="model"),
    _f("exp", "str", None, "v29 experiment preset", tuple(EXPERIMENTS), group="model"),
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
    # -- optimisation
    _f("optimizer", "str", "adamw", "optimizer", ("lion", "lion_v29", "adamw"), group="optim"),
    _f("lr", "float", 2e-3, "peak learning rate", group="optim"),
    _f("weight_decay", "float", 0.1, "decoupled weight decay (p *= 1 - lr*wd)", group="optim"),
    _f("wd_exempt_1d", "bool", False, "no decay for embeddings and 1-D tensors", group="optim"),
    _f("adam_betas", "str", "0.9,0.95", "AdamW betas 'b1,b2'", group="optim"),
    _f("adam_eps", "float", 1e-8, "AdamW epsilon", group="optim"),
    _f("lion_betas", "str", "0.9,0.99", "Lion betas 'b1,b2'", group="optim"),
    _f("grad_clip", "float", 1.0, "global-norm gradient clip (0 = off)", group="optim"),
    _f("lr_schedule", "str", "constant", "learning-rate schedule", ("constant", "cosine"), group="optim"),
    _f("warmup_steps", "int", 0, "linear warmup steps", group="optim"),
    _f("min_lr", "float", 0.0, "final learning rate of the cosine schedule", group="optim"),
    _f("steps", "int", 600, "optimizer steps", group="optim"),
    _f("batch_size", "int", 16, "micro-batch size (sequences)", group="optim"),
    _f("grad_accum", "int", 1, "micro-batches per optimizer step", group="optim"),
    _f("train_seq_len", "int", 128, "training sequence length (without --seq-schedule)", group="optim"),
    _f("seq_schedule", "str", None, "sequence curriculum 'LEN@STEP,...', e.g. '256@0,512@500'", group="optim"),
    _f("skip_nonfinite", "int", 0, "skip up to N steps whose loss or gradient norm is not finite (their update is "
       "not applied; each is logged) and stop at the next; 0 = stop at the first, keeping the last good checkpoint",
       group="optim"),
    # -- precision
    _f("param_dtype", "str", "fp32", "parameter dtype", ("fp32", "bf16"), group="precision"),
    _f("amp", "bool", False, "mixed precision: matmuls in --amp-dtype (softmax/logits/loss stay fp32)", group="precision"),
    _f("amp_dtype", "str", "bf16", "compute dtype under --amp", ("bf16", "fp16"), group="precision"),
    _f("grad_checkpoint", "bool", False, "rematerialise each block in the backward pass", group="precision"),
    # -- eval
    _f("eval_every", "int", 100, "evaluate every N steps (0 = only at the end)", group="eval"),
    _f("eval_iters", "int", 10, "batches per evaluation", group="eval"),
    _f("eval_seq_len", "int", 0, "evaluation sequence length (0 = the current training length)", group="eval"),
    # -- checkpoints and run dir
    _f("save_every", "int", 0, "save the 'last' checkpoint every N steps (0 = at the end only)", group="ckpt"),
    _f("resume", "bool", False, "continue the run in the out dir from its last checkpoint", group="ckpt"),
    _f("overwrite", "bool", False, "replace a run already in the out dir", group="ckpt"),
    _f("ckpt", "str", None, "initialise weights from a v29 .pt, an export or a run dir", group="ckpt"),
    _f("out_dir", "str", None, "run directory (default <run-root>/<name>)", group="ckpt"),
    _f("run_root", "str", "runs", "parent of default run directories", group="ckpt"),
    _f("run_tag", "str", None, "run name (default: 'default' for the plain recipe, else dba-<attn_mode>-<time>)", group="ckpt"),
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
    _f("live_update_every", "int", 1, "update the live display at most every N steps", group="display"),
    _f("log_every", "int", 10, "log a train event (and fetch the loss) every N steps", group="display"),
    # -- accepted for v29 command lines, recorded in meta, not acted on here
    # -- instrumentation (train/analysis.py)
    _f("instrument", "str", "off", "attention analysis: basic = routing means; medium = + ranks and matrices "
       "in analysis.h5; full = + singular values and per-layer values", ("off", "basic", "medium", "full"),
       group="analysis"),
    _f("analysis_every", "int", 0, "run the analysis every N steps (0 = at every eval)", group="analysis"),
    _f("analysis_heads", "str", "0", "heads to analyse: '0,3', negative from the end, or 'all'", group="analysis"),
    _f("analysis_layers", "str", "0,-1", "layers to analyse: '0,-1', negative from the end, or 'all'", group="analysis"),
    _f("analysis_local_window", "int", 32, "keys counted as local (self included)", group="analysis"),
    _f("analysis_max_tokens", "int", 256, "length of the held-out sequence analysed", group="analysis"),
    _f("analysis_save_scores", "bool", False, "also store the sem/geo score matrices in analysis.h5", group="analysis"),
    _f("analysis_topk", "int", 8, "k of the top-k attention mass", group="analysis"),
    _f("live_plot", "bool", False, "redraw analysis.png at every log step too (default: at evals and the end)",
       group="analysis"),
    _f("tb", "bool", False, "write TensorBoard scalars to <out>/tb (needs tensorboardX: pip install 'dba[tb]')",
       group="analysis"),
    _f("compile", "bool", False, "JAX always compiles the step", None, True, "v29"),
    _f("compile_mode", "str", "default", "", None, True, "v29"),
    _f("matmul_precision", "str", "high", "", ("highest", "high", "medium"), True, "v29"),
    _f("sync_timing", "bool", False, "", None, True, "v29"),
    _f("opt_foreach", "bool", False, "", None, True, "v29"),
    _f("opt_fused", "bool", False, "", None, True, "v29"),
    _f("max_new_tokens", "int", 50, "", None, True, "v29"),
    _f("prompt_tokens", "str", "0", "", None, True, "v29"),
    _f("temperature", "float", 1.0, "", None, True, "v29"),
    _f("top_k", "int", None, "", None, True, "v29"),
    # KV cache policy: used for the summary's KV memory section
    _f("kv_cache", "str", "fp16", "KV cache kind for the memory report", ("fp32", "fp16", "q8_0", "q4_0", "nf4"), True, "kv"),
    _f("kv_cache_k", "str", None, "", ("fp32", "fp16", "q8_0", "q4_0", "nf4"), True, "kv"),
    _f("kv_cache_v", "str", None, "", ("fp32", "fp16", "q8_0", "q4_0", "nf4"), True, "kv"),
    _f("kv_cache_k_sem", "str", None, "", ("fp32", "fp16", "q8_0", "q4_0", "nf4"), True, "kv"),
    _f("kv_cache_k_geo", "str", None, "", ("fp32", "fp16", "q8_0", "q4_0", "nf4"), True, "kv"),
    _f("kv_qblock", "int", 32, "", None, True, "kv"),
    _f("kv_qblock_k", "int", None, "", None, True, "kv"),
    _f("kv_qblock_v", "int", None, "", None, True, "kv"),
    _f("kv_qblock_k_sem", "int", None, "", None, True, "kv"),
    _f("kv_qblock_k_geo", "int", None, "", None, True, "kv"),
    _f("kv_residual", "int", 128, "", None, True, "kv"),
    _f("kv_decode_block", "int", 1024, "", None, True, "kv"),
    _f("kv_fused", "str", "auto", "", None, True, "kv"),
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
FLAGS += [_f(n, k, d, "", None, True, "v29") for n, k, d in _SELF_OPT]

FLAG_BY_NAME = {f.name: f for f in FLAGS}
DEFAULTS = {f.name: f.default for f in FLAGS}
MODEL_FLAGS = tuple(f.name for f in FLAGS if f.group == "model")
NOOP_FLAGS = tuple(f.name for f in FLAGS if f.noop and f.group != "kv")
# Flags that change nothing about what is trained: with only these, the run is "the default".
PRESENTATION_FLAGS = {"live", "live_update_every", "log_every", "device", "overwrite", "resume",
                      "run_root", "print_config", "mode", "compile", "matmul_precision", "debug",
                      # the mesh and hosts change how a run is computed, not what it trains
                      *(f.name for f in FLAGS if f.group in ("analysis", "distributed"))}
# Flags a resumed run may change without changing the run itself.
RESUME_MUTABLE = PRESENTATION_FLAGS | {"steps", "eval_every", "eval_iters", "save_every", "out_dir", "skip_nonfinite",
                                        "run_tag", "kv_cache", "kv_cache_k", "kv_cache_v", "kv_cache_k_sem",
                                        "kv_cache_k_geo", "kv_qblock", "kv_qblock_k", "kv_qblock_v",
                                        "kv_qblock_k_sem", "kv_qblock_k_geo", "kv_residual"} | set(NOOP_FLAGS)

_GROUP_TITLES = {
    "train": "run", "data": "data", "model": "model (v29 flags)", "optim": "optimisation",
    "precision": "precision", "eval": "evaluation", "ckpt": "checkpoints and run directory",
    "distributed": "devices and hosts (mesh, multi-host)", "display": "display", "analysis": "instrumentation and reports", "kv": "KV-cache policy (for the summary's memory section)",
    "v29": "accepted v29 flags (recorded, no effect here)",
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


def full_flags(explicit: dict[str, Any], base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Defaults, then `base` (a resumed run's saved flags), then what was typed."""
    out = dict(DEFAULTS)
    if base:
        out.update({k: v for k, v in base.items() if k in FLAG_BY_NAME})
    out.update(explicit)
    return out


def parse_betas(text: str, flag: str) -> tuple[float, float]:
    try:
        parts = [float(x) for x in str(text).split(",")]
    except ValueError:
        parts = []
    if len(parts) != 2 or not all(0.0 <= b < 1.0 for b in parts):
        raise UserError(f"--{flag.replace('_', '-')} must be two numbers in [0, 1) like '0.9,0.95', got {text!r}")
    return parts[0], parts[1]


# ---- the model config -------------------------------------------------------------------

def model_fields(flags: dict[str, Any], explicit: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig fields (without vocab_size/block_size) from presets and model flags."""
    fields: dict[str, Any] = dict(DEFAULT_MODEL)
    mode = flags.get("attn_mode") or (EXPERIMENTS[flags["exp"]]["attn_mode"] if flags.get("exp") else None)
    if flags.get("size"):
        fields.update(size_fields(flags["size"], mode or fields["attn_mode"]))
        fields.pop("block_size", None)
    if flags.get("exp"):
        fields.update(EXPERIMENTS[flags["exp"]])
    overrides: dict[str, Any] = {}
    simple = {"d_model": "d_model", "layers": "n_layer", "n_head": "n_head", "d_ff": "d_ff",
              "embed_dim": "embed_dim", "attn_mode": "attn_mode", "attn_dim": "attn_dim",
              "sem_dim": "sem_dim", "geo_dim": "geo_dim", "kv_head": "kv_head", "rope_base": "rope_base",
              "mlp": "mlp", "dropout": "dropout", "decoupled_scale": "decoupled_scale"}
    for flag, fieldname in simple.items():
        if flags.get(flag) is not None:
            overrides[fieldname] = flags[flag]
    if "d_model" in overrides:  # a new width carries its usual companions unless they are given
        overrides.setdefault("d_ff", 4 * overrides["d_model"])
        overrides.setdefault("embed_dim", overrides["d_model"])
    for on, off, fieldname in (("rope", "no_rope", "rope"), ("tie_qk", "no_tie_qk", "tie_qk"),
                               ("null_attn", "no_null_attn", "null_attn")):
        if flags.get(on) and flags.get(off):
            raise UserError(f"--{on.replace('_', '-')} and --{off.replace('_', '-')} contradict each other")
        if flags.get(on):
            overrides[fieldname] = True
        if flags.get(off):
            overrides[fieldname] = False
    if flags.get("no_learned_temp"):
        overrides["learned_temp"] = False
    fields.update(overrides)
    return fields


def check_flags(flags: dict[str, Any]) -> None:
    """Value checks argparse cannot do; one-line UserErrors (exit 2)."""
    def pos(name: str, allow_zero: bool = False) -> None:
        v = flags[name]
        if v is None or (v < 0 if allow_zero else v <= 0):
            need = ">= 0" if allow_zero else "> 0"
            raise UserError(f"--{name.replace('_', '-')} must be {need}, got {v}")

    for n in ("steps", "batch_size", "grad_accum", "train_seq_len", "eval_iters", "live_update_every", "log_every"):
        pos(n)
    for n in ("eval_every", "save_every", "warmup_steps", "eval_seq_len", "skip_nonfinite", "seed"):
        pos(n, allow_zero=True)
    if not 0.0 < float(flags["val_frac"]) < 1.0:
        raise UserError(f"--val-frac must be in (0, 1), got {flags['val_frac']}")
    if flags["lr"] < 0:
        raise UserError(f"--lr must be >= 0, got {flags['lr']}")
    if flags["grad_clip"] < 0:
        raise UserError(f"--grad-clip must be >= 0, got {flags['grad_clip']}")
    parse_betas(flags["adam_betas"], "adam_betas")
    parse_betas(flags["lion_betas"], "lion_betas")
    if flags["mode"] != "train":
        raise UserError("--mode sample is not part of `dba train`; use `dba sample`")
    if flags["device"] == "mps":
        raise UserError("JAX has no mps backend; on a Mac train elsewhere and run the weights with the "
                        "PyTorch reference (torch_ref.load(run_dir), `dba sample --backend torch`)")
    if flags["resume"] and flags["overwrite"]:
        raise UserError("--resume and --overwrite contradict each other")
    from train.distributed import init_args
    from train.sharding import check_batch, parse_mesh

    check_batch(parse_mesh(flags["mesh"]), int(flags["batch_size"]))  # the device count is checked once JAX is up
    init_args(flags["coordinator"], flags["num_processes"], flags["process_id"])


def default_run_name(flags: dict[str, Any], explicit: dict[str, Any]) -> str:
    if flags.get("run_tag"):
        return str(flags["run_tag"])
    if not (set(explicit) - PRESENTATION_FLAGS):
        return "default"
    mode = flags.get("attn_mode") or (EXPERIMENTS[flags["exp"]]["attn_mode"] if flags.get("exp")
                                      else DEFAULT_MODEL["attn_mode"])
    return f"dba-{mode}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def resolve_out_dir(flags: dict[str, Any], explicit: dict[str, Any]) -> tuple[str, str]:
    if flags.get("out_dir"):
        out = str(flags["out_dir"])
        return out, os.path.basename(os.path.normpath(out)) or out
    name = default_run_name(flags, explicit)
    return os.path.join(str(flags["run_root"]), name), name


def resolve_model(flags: dict[str, Any], explicit: dict[str, Any], vocab_size: int,
                  schedule: SeqSchedule, ckpt_cfg: ModelConfig | None = None) -> tuple[ModelConfig, dict[str, Any]]:
    """The ModelConfig (block_size grown to the longest length the run uses) and the growth record."""
    steps = int(flags["steps"])
    longest = schedule.max_length(steps)
    if flags["eval_seq_len"]:
        longest = max(longest, int(flags["eval_seq_len"]))
    if ckpt_cfg is not None:
        typed_model = [k for k in explicit if k in MODEL_FLAGS]
        if typed_model:
            given = model_fields(full_flags({k: explicit[k] for k in typed_model}), explicit)
            clash = [k for k in given if k in ckpt_cfg.to_dict() and
                     _typed_field(k, typed_model) and given[k] != getattr(ckpt_cfg, k)]
            if clash:
                k = clash[0]
                raise UserError(f"--ckpt model has {k}={getattr(ckpt_cfg, k)!r} but the flags ask for "
                                f"{given[k]!r}; drop the model flags to train the checkpoint's model")
        if ckpt_cfg.vocab_size < vocab_size:
            raise UserError(f"--ckpt model has vocab_size {ckpt_cfg.vocab_size} but the data needs {vocab_size}")
        fields = ckpt_cfg.to_dict()
        requested = int(flags["block"]) if flags.get("block") else ckpt_cfg.block_size
    else:
        fields = model_fields(flags, explicit)
        fields["vocab_size"] = int(vocab_size)
        if flags.get("block"):
            requested = int(flags["block"])
        elif flags.get("size"):
            requested = SIZES[flags["size"]]["block_size"]
        else:
            requested = longest
    block = max(requested, longest)
    fields["block_size"] = block
    try:
        cfg = ModelConfig.from_dict(fields)
    except ConfigError as e:
        raise UserError(f"model config: {e}") from None
    context = {"requested_block_size": requested, "block_size": block, "longest_train_len": longest,
               "grown": block > requested, "lengths": schedule.lengths_until(steps),
               "boundaries": schedule.boundaries(steps)}
    return cfg, context


_FLAG_FIELD = {"layers": "n_layer", "block": "block_size"}


def _typed_field(fieldname: str, typed: list[str]) -> bool:
    names = {_FLAG_FIELD.get(t, t) for t in typed}
    names |= {"rope" for t in typed if t in ("no_rope",)} | {"tie_qk" for t in typed if t == "no_tie_qk"}
    names |= {"null_attn" for t in typed if t == "no_null_attn"}
    names |= {"learned_temp" for t in typed if t == "no_learned_temp"}
    names.discard("block_size")
    return fieldname in names


def schedule_from(flags: dict[str, Any]) -> SeqSchedule:
    return parse_schedule(flags.get("seq_schedule"), int(flags["train_seq_len"]))
