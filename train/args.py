"""`dba train` flags (v29's names) and their conversion, once, into a typed `RunConfig`.

Every flag is declared with `default=SUPPRESS`, so the parsed namespace holds exactly the flags
the user typed. Knowing what was typed lets `--resume` take a run's saved flags and override only
what is given again, and lets the out dir default depend on whether anything but presentation
flags was given. `run_config(explicit, base)` then fills in the defaults below and builds the
frozen, validated dataclasses of train/config.py; from there on nothing reads a flags dict.

Each flag is declared once, here or in the table of the group it configures (the KV-cache flags
in dba/kvspec.py, the self-opt flags in dba/self_opt.py, the W&B flags in train/wandb_log.py),
and its default is the default of the dataclass field it fills (train/config.py), so a default
is written once. They train the
no-argument recipe: the model `dba.config.RECIPE` (a small decoupled model: d_model 128,
4 layers, 4 heads, sem/geo/attn 32/64/128) on the default corpus (CPython's pydoc topics through
the byte tokenizer, vocab 256), seq 128, batch 16, 600 AdamW steps at a constant lr 2e-3, which
finishes on a 2-core CPU in a few minutes with the validation loss falling from ~5.5.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Mapping

from dba.config import (
    ATTN_MODES,
    DECOUPLED_SCALES,
    EXPERIMENTS,
    MLP_KINDS,
    NORMS,
    PAPER_ALL,
    SIZE_TRAINING,
    SIZES,
)
from dba.data import DATA_FORMATS, TOKEN_DTYPES
from dba.flags import Flag, add_flags, field_default
from dba.kvspec import KV_FLAGS, KVPolicy
from dba.optimizers import OPTIMIZERS, SCHEDULES
from dba.self_opt import ALL_SELF_OPT_FLAGS
from train.config import BACKENDS, GROUP_TYPES, AnalysisConfig, RunConfig
from train.wandb_log import WANDB_FLAGS


def _f(name, kind, help="", choices=None, group="run", field=None):
    """A flag of a RunConfig group: its default is the group dataclass field's (train/config.py)."""
    default = field_default(GROUP_TYPES[group], field or name)
    return Flag(name, kind, default, help, tuple(choices) if choices else None, group, field)


def _recorded(name, kind, default=None, help=""):
    """A v29 flag accepted and recorded in the run's meta, not acted on by the JAX trainer."""
    return Flag(name, kind, default, help, None, "recorded")


FLAGS: list[Flag] = [
    # -- run
    _f("mode", "str", "v29's mode flag; only 'train' is valid for `dba train`", ("train", "sample")),
    _f("backend", "str", "framework that trains: jax (Flax NNX, Optax, Orbax; cpu/gpu/tpu, meshes) or torch "
       "(torch_ref; cpu, cuda, mps). auto: jax, or torch when --device is mps, cuda:N, or cuda/gpu without a JAX "
       "GPU backend", BACKENDS),
    _f("device", "str", "where to train: auto, cpu, gpu, cuda, cuda:N (torch), tpu (jax), mps (torch)"),
    _f("print_config", "bool", "print the resolved model config and args as JSON and exit"),
    _f("seed", "int", "seed for init, batches and dropout"),
    # -- data
    _f("data", "str", "token file (.npy / .bin / .pt / .txt); default: the built-in corpus", group="data",
       field="path"),
    _f("data_format", "str", "npy, bin (raw --data-dtype ids), pt (a torch.save'd integer tensor), text "
       "(v29: whitespace-separated integer ids), utf8 (text to tokenize with --tokenizer); auto: by extension, a "
       ".txt holding only digits and whitespace is ids (text), any other .txt is utf8", DATA_FORMATS, group="data",
       field="format"),
    _f("data_dtype", "str", "dtype of a raw .bin token file", TOKEN_DTYPES, group="data", field="dtype"),
    _f("tokenizer", "str", "byte, tiktoken:gpt2 (alias gpt2, tiktoken), or the path of a Hugging Face "
       "tokenizer.json (needs the tokenizers package to encode text). Text data is tokenized with it (default "
       "byte); with token-id data it is only recorded, so `dba sample --prompt TEXT` prints text. word (v29's "
       "default): accepted with token-id data, where it has no effect; refused for text", group="data"),
    _f("vocab_size", "int", "vocabulary size (default: the tokenizer's, else max id + 1)", group="data"),
    _f("val_frac", "float", "fraction of the tokens held out (the tail) for validation", group="data"),
    # -- model
    _f("size", "str", "v29 size preset: the model dims and, unless typed, --steps, --batch-size and "
       "--train-seq-len (tiny 6000/16/1024, small 10000/8/1024, medium 15000/4/2048, large 20000/2/2048, "
       "1b 20000/1/2048)", tuple(SIZES), group="model"),
    _f("exp", "str", "v29 experiment preset: paper_baseline, paper_bottleneck, paper_decoupled, paper_gqa; "
       f"{PAPER_ALL} trains those four one after another (one run directory each); train_decoupled_fast = "
       "decoupled + tie_qk + rope, no null attention (the model part only: unlike some v29 versions it sets no "
       "precision, optimizer or schedule flags). Without --out-dir the run is named (as in v29) "
       "<run-root>/[<size>_]<exp without 'paper_'>[_<run-tag>]", (*EXPERIMENTS, PAPER_ALL), group="model"),
    _f("d_model", "int", "model width (default 128; d_ff/embed_dim follow unless given)", group="model"),
    _f("layers", "int", "number of blocks (default 4)", group="model"),
    _f("n_head", "int", "attention heads (default 4)", group="model"),
    _f("d_ff", "int", "MLP width (default 4*d_model)", group="model"),
    _f("embed_dim", "int", "lexical bottleneck width (default d_model)", group="model"),
    _f("attn_mode", "str", "attention kind (default decoupled)", ATTN_MODES, group="model"),
    _f("attn_dim", "int", "V width (and Q/K for bottleneck/gqa), summed over heads", group="model"),
    _f("sem_dim", "int", "decoupled semantic Q/K width", group="model"),
    _f("geo_dim", "int", "decoupled geometric (RoPE) Q/K width", group="model"),
    _f("kv_head", "int", "K/V heads for gqa", group="model"),
    _f("decoupled_kv_head", "int", "decoupled K/V heads, each shared by n_head / K query heads (default n_head)",
       group="model"),
    _f("block", "int", "context length (block_size); grown to the longest trained length", group="model"),
    _f("rope_base", "float", "RoPE base", group="model"),
    _f("rope", "bool", "use RoPE (the default)", group="model"),
    _f("no_rope", "bool", "disable RoPE", group="model"),
    _f("tie_qk", "bool", "K projection is the Q projection", group="model"),
    _f("no_tie_qk", "bool", "untie Q and K (overrides a preset)", group="model"),
    _f("null_attn", "bool", "learned null key/value", group="model"),
    _f("no_null_attn", "bool", "no null attention (overrides a preset)", group="model"),
    _f("no_learned_temp", "bool", "disable the per-head learned temperature", group="model"),
    _f("mlp", "str", "MLP kind", MLP_KINDS, group="model"),
    _f("norm", "str", "normalisation: layernorm (v29's, weight and bias) or rmsnorm (Llama's, weight only)", NORMS,
       group="model"),
    _f("dropout", "float", "dropout rate", group="model"),
    _f("decoupled_scale", "str", "decoupled score scaling (SPEC §3)", DECOUPLED_SCALES, group="model"),
    # -- steps and batches
    _f("steps", "int", "optimizer steps (--size sets its own)", group="steps"),
    _f("batch_size", "int", "micro-batch size (sequences; --size sets its own)", group="steps"),
    _f("grad_accum", "int", "micro-batches per optimizer step", group="steps"),
    _f("train_seq_len", "int", "training sequence length (without --seq-schedule; --size: its context)",
       group="steps"),
    _f("seq_schedule", "str", "sequence curriculum 'LEN@STEP,...', e.g. '256@0,512@500'", group="steps"),
    # -- optimisation
    _f("optimizer", "str", "optimizer", OPTIMIZERS, group="optim", field="name"),
    _f("lr", "float", "peak learning rate", group="optim"),
    _f("weight_decay", "float", "decoupled weight decay (p *= 1 - lr*wd)", group="optim"),
    _f("wd_exempt_1d", "bool", "no decay for embeddings and 1-D tensors", group="optim"),
    _f("adam_betas", "str", "AdamW betas 'b1,b2'", group="optim"),
    _f("adam_eps", "float", "AdamW epsilon", group="optim"),
    _f("lion_betas", "str", "Lion betas 'b1,b2'", group="optim"),
    _f("grad_clip", "float", "global-norm gradient clip (0 = off)", group="optim"),
    _f("lr_schedule", "str", "learning-rate schedule", SCHEDULES, group="optim"),
    _f("warmup_steps", "int", "linear warmup steps", group="optim"),
    _f("min_lr", "float", "final learning rate of the cosine schedule", group="optim"),
    _f("skip_nonfinite", "int", "skip up to N steps whose loss or gradient norm is not finite (their update is "
       "not applied; each is logged) and stop at the next; 0 = stop at the first, keeping the last good checkpoint",
       group="optim"),
    # -- precision
    _f("param_dtype", "str", "parameter dtype (fp16 is refused: use bf16, or --amp --amp-dtype fp16)",
       ("fp32", "bf16", "fp16"), group="precision"),
    _f("amp", "bool", "mixed precision: matmuls in --amp-dtype (softmax/logits/loss stay fp32)", group="precision"),
    _f("amp_dtype", "str", "compute dtype under --amp", ("bf16", "fp16"), group="precision"),
    _f("grad_checkpoint", "bool", "rematerialise each block in the backward pass", group="precision"),
    _f("matmul_precision", "str", "fp32 matmul precision (v29's torch knob; 'medium' = bf16 passes on "
       "accelerators)", ("highest", "high", "medium"), group="precision"),
    # -- eval
    _f("eval_every", "int", "evaluate every N steps (0 = only at the end)", group="eval", field="every"),
    _f("eval_iters", "int", "batches per evaluation", group="eval", field="iters"),
    _f("eval_seq_len", "int", "evaluation sequence length (0 = the current training length)", group="eval",
       field="seq_len"),
    # -- checkpoints and run dir
    _f("save_every", "int", "save the 'last' checkpoint every N steps (0 = at the end only)", group="ckpt"),
    _f("resume", "bool", "continue the run in the out dir from its last checkpoint", group="ckpt"),
    _f("overwrite", "bool", "replace a run already in the out dir", group="ckpt"),
    _f("ckpt", "str", "initialise weights from a v29 .pt, an export or a run dir", group="ckpt"),
    # -- distillation (a student from dba upcycle, or any model, learning from a frozen teacher)
    _f("distill_from", "str", "the teacher (checkpoint, export or run dir): it runs frozen inside the train step",
       group="distill"),
    _f("distill_loss", "str", "kl: temp^2 KL(teacher || student); ce: the data's cross-entropy only (the teacher "
       "is measured); kl+ce: alpha KL + (1 - alpha) CE", group="distill", field="loss",
       choices=("kl", "ce", "kl+ce")),
    _f("distill_temp", "float", "softmax temperature of the KL term", group="distill", field="temp"),
    _f("distill_alpha", "float", "weight of the KL term in kl+ce", group="distill", field="alpha"),
    _f("distill_blockwise", "int", "the first N steps train each layer's attention to reproduce the teacher's "
       "attention output on the teacher's own layer input (the rest frozen by construction), then --distill-loss",
       group="distill", field="blockwise"),
    _f("distill_teacher_dtype", "str", "the teacher's weights and compute dtype", group="distill",
       field="teacher_dtype", choices=("fp32", "bf16")),
    _f("out_dir", "str", "run directory (default <run-root>/<name>)", group="ckpt"),
    _f("run_root", "str", "parent of default run directories", group="ckpt"),
    _f("run_tag", "str", "with --exp (v29): appended to the name [<size>_]<exp>_<tag>; otherwise the run "
       "name (default: 'default' for the plain recipe, else dba-<attn_mode>-<time>)", group="ckpt"),
    _recorded("save_optim", "bool", False, "v29 saved the optimizer state only with this flag; dba always saves it "
       "(every checkpoint can be resumed)"),
    # -- devices and hosts (train/sharding.py, train/distributed.py); not inherited by --resume
    _f("mesh", "str", "device mesh 'data=N,fsdp=M' over all devices: the batch is split over both axes, "
       "parameters and optimizer state over fsdp; one size may be -1 (the rest). Default: one device",
       group="distributed"),
    _f("coordinator", "str", "multi-host: HOST:PORT of process 0 (with --num-processes, --process-id; "
       "Slurm/Open MPI/TPU pods are detected without them)", group="distributed"),
    _f("num_processes", "int", "multi-host: number of processes (one per host)", group="distributed"),
    _f("process_id", "int", "multi-host: this process's index in [0, --num-processes)", group="distributed"),
    # -- display
    _f("live", "str", "progress display", ("auto", "rich", "basic", "off"), group="display"),
    _f("live_update_every", "int", "update the live display at most every N steps", group="display",
       field="update_every"),
    _f("log_every", "int", "log a train event (and fetch the loss) every N steps", group="display"),
    # -- instrumentation (train/analysis.py)
    _f("instrument", "str", "attention analysis: basic = routing means; medium = + ranks and matrices "
       "in analysis.h5; full = + singular values and per-layer values", AnalysisConfig.LEVELS, group="analysis"),
    _f("analysis_every", "int", "run the analysis every N steps; 0 = no analysis (as in v29); default: at "
       "every eval", group="analysis", field="every_given"),
    _f("analysis_heads", "str", "heads to analyse: '0,3', negative from the end, or 'all'", group="analysis",
       field="heads"),
    _f("analysis_layers", "str", "layers to analyse: '0,-1', negative from the end, or 'all'",
       group="analysis", field="layers"),
    _f("analysis_local_window", "int", "keys counted as local (self included)", group="analysis",
       field="local_window"),
    _f("analysis_max_tokens", "int", "length of the held-out sequence analysed", group="analysis",
       field="max_tokens"),
    _f("analysis_save_scores", "bool", "also store the sem/geo score matrices in analysis.h5",
       group="analysis", field="save_scores"),
    _f("analysis_topk", "int", "k of the top-k attention mass", group="analysis", field="topk"),
    _f("live_plot", "bool", "redraw analysis.png at every log step too (default: at evals and the end)",
       group="analysis"),
    _f("tb", "bool", "write TensorBoard scalars to <out>/tb (needs tensorboardX: pip install 'dba[tb]')",
       group="analysis"),
    *WANDB_FLAGS,  # --wandb* (train/wandb_log.py's table)
    # -- KV cache policy: the summary's KV memory section (sampling takes the same flags)
    *KV_FLAGS,  # dba/kvspec.py's table (group "kv": the summary's cache policy)
    _recorded("kv_decode_block", "int", 1024),
    _recorded("kv_fused", "str", "auto"),
    # -- accepted for v29 command lines, recorded in meta, not acted on here
    _recorded("compile", "bool", False, "PyTorch trainer: torch.compile the step (not on mps; falls back to eager, saying "
       "why). JAX always compiles the step"),
    _recorded("compile_mode", "str", "default", "torch.compile mode for --compile (default, reduce-overhead, "
       "max-autotune)"),
    _recorded("sync_timing", "bool", False),
    _recorded("opt_foreach", "bool", False),
    _recorded("opt_fused", "bool", False),
    _recorded("max_new_tokens", "int", 50),
    _recorded("prompt_tokens", "str", "0"),
    _recorded("temperature", "float", 1.0),
    _recorded("top_k", "int", None),
]

# v29's self-optimisation knobs (decode-time autotuning, dba/self_opt.py's tables): accepted so v29
# command lines parse, and recorded.
FLAGS += [dataclasses.replace(f, group="recorded", field=None, help="") for f in ALL_SELF_OPT_FLAGS]

FLAG_BY_NAME = {f.name: f for f in FLAGS}
DEFAULTS = {f.name: f.default for f in FLAGS}
FLAG_FIELDS = {f.name: (f.group, f.attr) for f in FLAGS}
MODEL_FLAGS = tuple(f.name for f in FLAGS if f.group == "model")
# Flags that change nothing about what is trained: with only these, the run is "the default".
PRESENTATION_FLAGS = frozenset({
    "live", "live_update_every", "log_every", "device", "backend", "overwrite", "resume", "run_root", "print_config",
    "mode", "compile", "matmul_precision",
    # the analysis and the mesh and hosts change how a run is observed or computed, not what it trains
    *(f.name for f in FLAGS if f.group in ("analysis", "distributed", "wandb"))})
# Flags a resumed run may not change: they define the model, the data or the optimizer state.
FIXED_ON_RESUME = frozenset(MODEL_FLAGS) | {"data", "data_format", "data_dtype", "tokenizer", "vocab_size",
                                            "val_frac", "seed", "optimizer", "param_dtype", "batch_size",
                                            "grad_accum", "ckpt", "distill_from", "distill_loss", "distill_temp",
                                            "distill_alpha", "distill_blockwise", "distill_teacher_dtype"}
# This invocation's switches and hardware: never taken from the run being resumed.
NOT_INHERITED = frozenset({"resume", "overwrite", "print_config", "device", "backend", "live", "mode",
                           "mesh", "coordinator", "num_processes", "process_id",
                           "wandb_id"})  # a resumed run logs to the W&B run it recorded (train/run.py)

_GROUP_TITLES = {
    "run": "run", "data": "data", "model": "model (v29 flags)", "steps": "steps and batches",
    "optim": "optimisation", "precision": "precision", "eval": "evaluation", "ckpt": "checkpoints and run directory",
    "distributed": "devices and hosts (mesh, multi-host)", "display": "display",
    "analysis": "instrumentation and reports", "distill": "distillation from a teacher", "wandb": "Weights & Biases (--wandb)",
    "kv": "KV-cache policy (for the summary's memory section)",
    "recorded": "accepted v29 flags (recorded; --compile and --compile-mode act in the PyTorch trainer)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every flag in its titled group, default=SUPPRESS (see the module docstring)."""
    for group, title in _GROUP_TITLES.items():
        flags = [f if f.help else dataclasses.replace(f, help="v29 flag, recorded only")
                 for f in FLAGS if f.group == group]
        add_flags(parser.add_argument_group(title), flags, suppress=True)


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
