"""The typed configuration of a `dba train` run: one frozen, validated dataclass per flag group.

`train/args.py` declares the flags (v29's names) and builds a `RunConfig` from the flags the user
typed, once; nothing below the CLI reads a flags dict. Each group checks its own values when it
is built and names the flag in a one-line `UserError` (exit 2). `RunConfig.to_flags()` gives the
flat record of flag values that the run directory keeps (`meta` event, checkpoint meta,
`summary.md`), which `--resume` and `dba report` read back.
"""

from __future__ import annotations

import dataclasses
import math
import datetime
import os
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from dba.config import (
    EXPERIMENTS,
    PAPER_ALL,
    RECIPE,
    SIZES,
    ConfigError,
    ModelConfig,
    size_fields,
)
from dba.errors import UserError
from dba.kvspec import KVPolicy
from dba.optimizers import ADAM_EPS, DEFAULT_BETAS, LRSchedule, check_optimizer, parse_betas
from train.curriculum import SeqSchedule, parse_schedule
from train.wandb_log import WandbConfig

def flag_text(name: str) -> str:
    """The command-line spelling of a flag: `eval_every` -> `--eval-every`."""
    return "--" + name.replace("_", "-")


def _at_least(value: Any, minimum: int, flag: str) -> None:
    if value is None or value < minimum:
        raise UserError(f"{flag_text(flag)} must be {'> 0' if minimum == 1 else '>= 0'}, got {value}")


BACKENDS = ("auto", "jax", "torch")
JAX_DEVICES = ("auto", "cpu", "gpu", "cuda", "tpu")
TORCH_DEVICES = ("auto", "cpu", "cuda", "gpu", "mps")  # and cuda:N


def _is_cuda_n(device: str) -> bool:
    return device.startswith("cuda:") and device[5:].isdigit()


@dataclass(frozen=True)
class RunSettings:
    """What this invocation is: v29's mode flag, the framework and device, the seed."""

    mode: str = "train"
    backend: str = "auto"
    device: str = "auto"
    print_config: bool = False
    seed: int = 1337

    def __post_init__(self) -> None:
        if self.mode != "train":
            raise UserError("--mode sample is not part of `dba train`; use `dba sample`")
        if self.backend not in BACKENDS:
            raise UserError(f"--backend {self.backend!r}: expected one of {', '.join(BACKENDS)}")
        d = self.device
        if d not in set(JAX_DEVICES) | set(TORCH_DEVICES) and not _is_cuda_n(d):
            raise UserError(f"--device {d!r}: expected auto, cpu, gpu, cuda, cuda:N, tpu or mps")
        if self.backend == "jax" and d not in JAX_DEVICES:
            why = ("JAX has no mps backend" if d == "mps" else
                   "JAX takes every visible GPU; pick one with CUDA_VISIBLE_DEVICES=N and --device cuda")
            raise UserError(f"--backend jax --device {d}: {why}; or train with --backend torch")
        if self.backend == "torch" and d == "tpu":
            raise UserError("--backend torch --device tpu: the torch trainer runs on cpu, cuda and mps; "
                            "train on TPUs with --backend jax")
        _at_least(self.seed, 0, "seed")

    def wants_torch(self) -> bool | None:
        """True/False when the flags alone decide the framework; None when it depends on whether
        JAX can serve the GPU (auto backend, --device cuda/gpu)."""
        if self.backend != "auto":
            return self.backend == "torch"
        if self.device == "mps" or _is_cuda_n(self.device):
            return True
        if self.device in ("cuda", "gpu"):
            return None
        return False


@dataclass(frozen=True)
class DataConfig:
    path: str | None = None
    format: str = "auto"
    dtype: str = "uint16"
    tokenizer: str | None = None  # None: byte for text, nothing recorded for token ids
    vocab_size: int | None = None
    val_frac: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 < float(self.val_frac) < 1.0:
            raise UserError(f"--val-frac must be in (0, 1), got {self.val_frac}")
        if self.tokenizer is not None:
            from dba.data import WORD_REFUSED, parse_tokenizer

            if parse_tokenizer(self.tokenizer)[0] == "word" and self.path is None:
                raise UserError(f"{WORD_REFUSED}; the built-in corpus is text")


@dataclass(frozen=True)
class ModelFlags:
    """The model flags as typed (v29's names); `resolve` turns them into a ModelConfig."""

    size: str | None = None
    exp: str | None = None
    d_model: int | None = None
    layers: int | None = None
    n_head: int | None = None
    d_ff: int | None = None
    embed_dim: int | None = None
    attn_mode: str | None = None
    attn_dim: int | None = None
    sem_dim: int | None = None
    geo_dim: int | None = None
    kv_head: int | None = None
    decoupled_kv_head: int | None = None
    block: int | None = None
    rope_base: float | None = None
    rope: bool = False
    no_rope: bool = False
    tie_qk: bool = False
    no_tie_qk: bool = False
    null_attn: bool = False
    no_null_attn: bool = False
    no_learned_temp: bool = False
    mlp: str | None = None
    norm: str | None = None
    dropout: float | None = None
    decoupled_scale: str | None = None

    # flag -> ModelConfig field, where they are set from one value
    SIMPLE: ClassVar[dict[str, str]] = {
        "d_model": "d_model", "layers": "n_layer", "n_head": "n_head", "d_ff": "d_ff", "embed_dim": "embed_dim",
        "attn_mode": "attn_mode", "attn_dim": "attn_dim", "sem_dim": "sem_dim", "geo_dim": "geo_dim",
        "kv_head": "kv_head", "decoupled_kv_head": "decoupled_kv_head", "rope_base": "rope_base", "mlp": "mlp", "norm": "norm", "dropout": "dropout",
        "decoupled_scale": "decoupled_scale"}
    SWITCHES: ClassVar[tuple[tuple[str, str, str], ...]] = (
        ("rope", "no_rope", "rope"), ("tie_qk", "no_tie_qk", "tie_qk"), ("null_attn", "no_null_attn", "null_attn"))

    def __post_init__(self) -> None:
        for on, off, _ in self.SWITCHES:
            if getattr(self, on) and getattr(self, off):
                raise UserError(f"{flag_text(on)} and {flag_text(off)} contradict each other")
        if self.exp == PAPER_ALL:  # cli/train.py expands it into the four runs before this
            raise UserError(f"--exp {PAPER_ALL} is four runs, not one model: run it with `dba train`")

    @property
    def mode(self) -> str:
        """The attention mode these flags ask for (the recipe's decoupled unless given)."""
        return self.attn_mode or (EXPERIMENTS[self.exp]["attn_mode"] if self.exp else RECIPE["attn_mode"])

    def overrides(self) -> dict[str, Any]:
        """ModelConfig fields given by the flags themselves (no presets, no defaults)."""
        out: dict[str, Any] = {}
        for flag, field in self.SIMPLE.items():
            if getattr(self, flag) is not None:
                out[field] = getattr(self, flag)
        if "d_model" in out:  # a new width carries its usual companions unless they are given
            out.setdefault("d_ff", 4 * out["d_model"])
            out.setdefault("embed_dim", out["d_model"])
        for on, off, field in self.SWITCHES:
            if getattr(self, on):
                out[field] = True
            if getattr(self, off):
                out[field] = False
        if self.no_learned_temp:
            out["learned_temp"] = False
        return out

    def fields(self) -> dict[str, Any]:
        """ModelConfig fields (without vocab_size/block_size) that differ from its defaults: the
        recipe, then presets, then flags."""
        fields: dict[str, Any] = dict(RECIPE)
        if self.size:
            fields.update(size_fields(self.size, self.attn_mode or (EXPERIMENTS[self.exp]["attn_mode"] if self.exp
                                                                    else fields["attn_mode"])))
            fields.pop("block_size", None)
        if self.exp:
            fields.update(EXPERIMENTS[self.exp])
        fields.update(self.overrides())
        return fields


@dataclass(frozen=True)
class StepsConfig:
    """How much is trained and in what batches: steps, batch, accumulation, sequence curriculum."""

    steps: int = 600
    batch_size: int = 16
    grad_accum: int = 1
    train_seq_len: int = 128
    seq_schedule: str | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "train_seq_len"):
            _at_least(getattr(self, name), 1, name)
        self.schedule  # noqa: B018 (parsed once here so a malformed schedule fails with the flags)

    @property
    def schedule(self) -> SeqSchedule:
        return parse_schedule(self.seq_schedule, int(self.train_seq_len))


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adamw"  # --optimizer
    lr: float = 2e-3
    weight_decay: float = 0.1
    wd_exempt_1d: bool = False
    adam_betas: str = ",".join(map(str, DEFAULT_BETAS["adamw"]))  # as typed: 'b1,b2'
    adam_eps: float = ADAM_EPS
    lion_betas: str = ",".join(map(str, DEFAULT_BETAS["lion"]))
    grad_clip: float = 1.0
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    min_lr: float = 0.0
    skip_nonfinite: int = 0

    def __post_init__(self) -> None:
        if self.lr < 0:
            raise UserError(f"--lr must be >= 0, got {self.lr}")
        if self.grad_clip < 0:
            raise UserError(f"--grad-clip must be >= 0, got {self.grad_clip}")
        _at_least(self.warmup_steps, 0, "warmup_steps")
        _at_least(self.skip_nonfinite, 0, "skip_nonfinite")
        parse_betas(self.adam_betas, "adam_betas")
        parse_betas(self.lion_betas, "lion_betas")
        check_optimizer(self.name, lr=self.lr, weight_decay=self.weight_decay, lr_schedule=self.lr_schedule,
                        warmup_steps=self.warmup_steps, min_lr=self.min_lr)

    @property
    def betas(self) -> tuple[float, float]:
        """The betas of the chosen optimizer (--adam-betas for AdamW, --lion-betas for Lion)."""
        if self.name == "adamw":
            return parse_betas(self.adam_betas, "adam_betas")
        return parse_betas(self.lion_betas, "lion_betas")

    def schedule(self, total_steps: int) -> LRSchedule:
        """The learning rate over a run of `total_steps` (dba/optimizers.py's formula)."""
        return LRSchedule(float(self.lr), int(total_steps), self.lr_schedule, int(self.warmup_steps),
                          float(self.min_lr))


@dataclass(frozen=True)
class PrecisionConfig:
    param_dtype: str = "fp32"
    amp: bool = False
    amp_dtype: str = "bf16"
    grad_checkpoint: bool = False
    matmul_precision: str = "high"  # v29's torch knob; maps onto jax_default_matmul_precision

    def __post_init__(self) -> None:
        if self.param_dtype == "fp16":
            raise UserError("--param-dtype fp16 is not supported: fp16 weights without fp32 master copies round "
                            "small updates away and fp16 gradients underflow without loss scaling; use "
                            "--param-dtype bf16, or fp32 weights with --amp --amp-dtype fp16")

    @property
    def compute_dtype(self) -> str:
        """The matmul dtype name: --amp-dtype under --amp, else the parameter dtype."""
        return self.amp_dtype if self.amp else self.param_dtype


@dataclass(frozen=True)
class EvalConfig:
    every: int = 100
    iters: int = 10
    seq_len: int = 0  # 0 = the current training length

    def __post_init__(self) -> None:
        _at_least(self.every, 0, "eval_every")
        _at_least(self.iters, 1, "eval_iters")
        _at_least(self.seq_len, 0, "eval_seq_len")


@dataclass(frozen=True)
class AnalysisConfig:
    """`--instrument` and its `--analysis-*` knobs, plus the plots and TensorBoard switches."""

    LEVELS: ClassVar[tuple[str, ...]] = ("off", "basic", "medium", "full")

    instrument: str = "off"
    every_given: int | None = None  # --analysis-every as given: None = at every evaluation, 0 = no analysis (v29)
    heads: str = "0"
    layers: str = "0,-1"
    local_window: int = 32
    max_tokens: int = 256
    save_scores: bool = False
    topk: int = 8
    live_plot: bool = False
    tb: bool = False

    def __post_init__(self) -> None:
        if self.instrument not in self.LEVELS:
            raise UserError(f"--instrument {self.instrument!r}: expected one of {', '.join(self.LEVELS)}")
        for field, flag in (("max_tokens", "analysis_max_tokens"), ("topk", "analysis_topk"),
                            ("local_window", "analysis_local_window")):
            if int(getattr(self, field)) < 1:
                raise UserError(f"{flag_text(flag)} {getattr(self, field)}: must be >= 1")
        if self.every_given is not None and int(self.every_given) < 0:
            raise UserError(f"--analysis-every {self.every_given}: must be >= 0")

    @property
    def every(self) -> int:
        """Steps between analyses; 0 = at every evaluation (when `enabled`)."""
        return int(self.every_given or 0)

    @property
    def enabled(self) -> bool:
        """An analysis level is asked for and `--analysis-every 0` (v29: off) was not given."""
        return self.instrument != "off" and self.every_given != 0


@dataclass(frozen=True)
class CheckpointConfig:
    """Checkpoints and the run directory."""

    save_every: int = 0
    resume: bool = False
    overwrite: bool = False
    ckpt: str | None = None
    out_dir: str | None = None
    run_root: str = "runs"
    run_tag: str | None = None

    def __post_init__(self) -> None:
        _at_least(self.save_every, 0, "save_every")
        if self.resume and self.overwrite:
            raise UserError("--resume and --overwrite contradict each other")


@dataclass(frozen=True)
class DistributedConfig:
    """The device mesh and the multi-host start (not inherited by --resume)."""

    mesh: str | None = None
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    @property
    def mesh_axes(self) -> dict[str, int]:
        from train.sharding import parse_mesh

        return parse_mesh(self.mesh)

    def check(self, batch_size: int) -> None:
        """The mesh's syntax and the batch split (the device count is checked once JAX is up),
        and the multi-host flags."""
        from train.distributed import init_args
        from train.sharding import check_batch

        check_batch(self.mesh_axes, int(batch_size))
        init_args(self.coordinator, self.num_processes, self.process_id)


DISTILL_LOSSES = ("kl", "ce", "kl+ce")
TEACHER_DTYPES = ("fp32", "bf16")


@dataclass(frozen=True)
class DistillConfig:
    """Distillation from a frozen teacher that runs inside the train step (train/distill.py)."""

    distill_from: str | None = None  # the teacher: a checkpoint, export or run directory
    loss: str = "kl"  # kl: temp^2 KL(teacher || student); ce: the data's CE (teacher measured only); kl+ce
    temp: float = 1.0
    alpha: float = 0.5  # kl+ce: alpha * KL + (1 - alpha) * CE
    blockwise: int = 0  # the first N steps match each layer's attention output to the teacher's
    teacher_dtype: str = "fp32"

    def __post_init__(self) -> None:
        if self.loss not in DISTILL_LOSSES:
            raise UserError(f"--distill-loss {self.loss!r}: choose {'|'.join(DISTILL_LOSSES)}")
        if self.teacher_dtype not in TEACHER_DTYPES:
            raise UserError(f"--distill-teacher-dtype {self.teacher_dtype!r}: choose {'|'.join(TEACHER_DTYPES)}")
        if not (isinstance(self.temp, (int, float)) and math.isfinite(self.temp) and self.temp > 0):
            raise UserError(f"--distill-temp must be positive, got {self.temp!r}")
        if not (isinstance(self.alpha, (int, float)) and 0.0 <= self.alpha <= 1.0):
            raise UserError(f"--distill-alpha must be in [0, 1], got {self.alpha!r}")
        _at_least(self.blockwise, 0, "distill_blockwise")

    @property
    def on(self) -> bool:
        return self.distill_from is not None

    def objective(self, kl, ce):
        """The main phase's loss from its two terms (arrays of either framework, or floats)."""
        if self.loss == "kl":
            return kl
        if self.loss == "ce":
            return ce
        return float(self.alpha) * kl + (1.0 - float(self.alpha)) * ce


@dataclass(frozen=True)
class DisplayConfig:
    live: str = "auto"
    update_every: int = 1
    log_every: int = 10

    def __post_init__(self) -> None:
        _at_least(self.update_every, 1, "live_update_every")
        _at_least(self.log_every, 1, "log_every")


# The attribute of RunConfig that holds each group (the flag table's `group=`).
GROUP_TYPES: dict[str, type] = {
    "run": RunSettings, "data": DataConfig, "model": ModelFlags, "steps": StepsConfig, "optim": OptimConfig,
    "precision": PrecisionConfig, "eval": EvalConfig, "analysis": AnalysisConfig, "ckpt": CheckpointConfig,
    "distributed": DistributedConfig, "display": DisplayConfig, "distill": DistillConfig, "wandb": WandbConfig,
}


@dataclass(frozen=True)
class RunConfig:
    """Everything a run is configured with, typed and validated, grouped as the flags are."""

    run: RunSettings
    data: DataConfig
    model: ModelFlags
    steps: StepsConfig
    optim: OptimConfig
    precision: PrecisionConfig
    eval: EvalConfig
    analysis: AnalysisConfig
    ckpt: CheckpointConfig
    distributed: DistributedConfig
    display: DisplayConfig
    distill: DistillConfig
    wandb: WandbConfig  # --wandb* (train/wandb_log.py declares the flags)
    kv: KVPolicy  # the cache policy of the summary's KV-memory section
    recorded: Mapping[str, Any]  # flags accepted for v29 command lines and recorded only (incl. kv extras)
    explicit: frozenset[str]  # the flags typed on this command line
    # flag name -> (group, field): filled in by train/args.py's table, so to_flags can undo it
    flag_fields: Mapping[str, tuple[str, str]] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:  # checks that span groups
        o = self.optim
        check_optimizer(o.name, lr=o.lr, weight_decay=o.weight_decay, lr_schedule=o.lr_schedule,
                        warmup_steps=o.warmup_steps, total_steps=self.steps.steps, min_lr=o.min_lr)
        self.distributed.check(self.steps.batch_size)

    def to_flags(self) -> dict[str, Any]:
        """The flat record {flag name: value} of this configuration (v29's names)."""
        out: dict[str, Any] = {}
        for flag, (group, field) in self.flag_fields.items():
            if group == "kv":
                out[flag] = getattr(self.kv, field)
            elif group == "recorded":
                out[flag] = self.recorded.get(flag)
            else:
                out[flag] = getattr(getattr(self, group), field)
        return out

    def noop_flags(self) -> dict[str, Any]:
        """The v29-only flags typed on this command line, with their values."""
        return {k: self.recorded[k] for k in sorted(self.explicit) if k in self.recorded}

    # ---- resolution against the data and the checkpoint ----------------------------------
    def resolve_model(self, vocab_size: int, ckpt_cfg: ModelConfig | None = None,
                      check_clash: bool = True) -> tuple[ModelConfig, dict[str, Any]]:
        """The ModelConfig (block_size grown to the longest length the run uses) and the growth
        record. With `ckpt_cfg` (--ckpt, --resume) the model is the checkpoint's; model flags
        typed now must agree with it (unless `check_clash` is off, as on --resume)."""
        steps, schedule = int(self.steps.steps), self.steps.schedule
        longest = schedule.max_length(steps)
        if self.eval.seq_len:
            longest = max(longest, int(self.eval.seq_len))
        m = self.model
        if ckpt_cfg is not None:
            if check_clash:
                self._check_ckpt_clash(ckpt_cfg)
            if ckpt_cfg.vocab_size < vocab_size:
                raise UserError(f"--ckpt model has vocab_size {ckpt_cfg.vocab_size} but the data needs {vocab_size}")
            fields = ckpt_cfg.to_dict()
            requested = int(m.block) if m.block else ckpt_cfg.block_size
        else:
            fields = m.fields()
            fields["vocab_size"] = int(vocab_size)
            requested = int(m.block) if m.block else (SIZES[m.size]["block_size"] if m.size else longest)
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

    def _check_ckpt_clash(self, ckpt_cfg: ModelConfig) -> None:
        typed = [k for k in self.explicit if k in self.flag_fields and self.flag_fields[k][0] == "model"]
        if not typed:
            return
        given = dataclasses.replace(ModelFlags(), **{self.flag_fields[k][1]: getattr(self.model, self.flag_fields[k][1])
                                                     for k in typed}).fields()
        typed_fields = {ModelFlags.SIMPLE.get(k, k) for k in typed} - {"block"}
        typed_fields |= {field for on, off, field in ModelFlags.SWITCHES if on in typed or off in typed}
        typed_fields |= {"learned_temp"} if "no_learned_temp" in typed else set()
        ckpt = ckpt_cfg.to_dict()
        clash = [k for k in given if k in ckpt and k in typed_fields and given[k] != ckpt[k]]
        if clash:
            k = clash[0]
            raise UserError(f"--ckpt model has {k}={ckpt[k]!r} but the flags ask for "
                            f"{given[k]!r}; drop the model flags to train the checkpoint's model")

    # ---- where the run goes -------------------------------------------------------------
    def preset_name(self) -> str | None:
        """v29's run name with --exp: '[<size>_]<exp without paper_>[_<run-tag>]' (v29 named
        runs so with --size and --exp; without --size the name starts at the experiment)."""
        m = self.model
        if not m.exp:
            return None
        parts = [m.size, m.exp.removeprefix("paper_"), self.ckpt.run_tag]
        return "_".join(str(p) for p in parts if p)

    def run_name(self, presentation: frozenset[str]) -> str:
        """v29's preset name (--exp, --size); --run-tag; 'default' when only flags in
        `presentation` were typed (or --resume without a name); else a timestamped name."""
        preset = self.preset_name()
        if preset:
            return preset
        if self.ckpt.run_tag:
            return str(self.ckpt.run_tag)
        if self.ckpt.resume or not (self.explicit - presentation):
            return "default"
        return f"dba-{self.model.mode}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"

    def name_is_generated(self, presentation: frozenset[str]) -> bool:
        """The run name is a timestamp (never shared: a second run that second gets '-2')."""
        fixed = self.ckpt.out_dir or self.ckpt.run_tag or self.ckpt.resume or self.preset_name()
        return not fixed and bool(self.explicit - presentation)

    def out_dir(self, presentation: frozenset[str]) -> tuple[str, str]:
        """(run directory, run name)."""
        if self.ckpt.out_dir:
            out = str(self.ckpt.out_dir)
            return out, os.path.basename(os.path.normpath(out)) or out
        name = self.run_name(presentation)
        return os.path.join(str(self.ckpt.run_root), name), name
