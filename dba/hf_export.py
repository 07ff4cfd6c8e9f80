"""`dba convert SRC DIR`: dba's weights as a Hugging Face model directory (framework-free: no
torch, no transformers; the directory is for them to read).

Two kinds of directory, chosen from the config (`native_family`):
- **native**: a model transformers' own classes compute, with no code of ours. A dba model is a
  Llama when its attention is `standard`, `bottleneck` or `gqa` (query and value heads of one
  width: Llama's `head_dim`), with RMSNorm, SwiGLU, RoPE (default or llama3 frequencies), no
  learned temperature, no null key, no tied Q/K, no embedding bottleneck, and either no attention
  biases or biases on q/k/v and o together (Llama's `attention_bias`; `mlp_bias` as it is). With
  biases on q/k/v but not o and none on the MLP it is a Qwen2 (whose head dim is d_model / n_head).
  config.json carries the family's fields, the RoPE settings in both spellings (the hub's
  `rope_theta` + `rope_scaling`, which transformers 4.x reads and 5.x folds into
  `rope_parameters`, and 5.x's `rope_parameters`), and the tensors get the family's names
  (`dba.hf_config.canonical_to_hf`).
- **custom code**: every other model (decoupled attention, LayerNorm, learned temperature, null
  attention, tied Q/K, the lexical bottleneck, GELU, no RoPE, ...). The directory holds
  `configuration_dba.py` and `modeling_dba.py` (dba/hf_remote/, our own code: torch and
  transformers only) with `auto_map` in config.json, so
  `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` loads it. The tensors keep
  dba's canonical names (a tie_qk model stores the Q projection once), and the file's metadata
  also carries dba's config, so `dba sample --ckpt DIR/model.safetensors` reads it too. The model
  keeps no KV cache: generation through transformers recomputes the sequence at every step.

The tokenizer comes along when it is known: a recorded tokenizer.json is copied (with a
tokenizer_config.json naming the generic fast tokenizer), dba's byte tokenizer is written as an
equivalent byte-level tokenizer.json; tiktoken's GPT-2 is only named (its files are tiktoken's).

The directory is written under a temporary name in the destination's parent and renamed into
place, so a failure leaves nothing and an existing directory is replaced only whole
(`overwrite`, and only when it is a model directory: it holds a config.json).
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from dba.config import ModelConfig
from dba.data import file_sha256
from dba.errors import UserError
from dba.hf_config import canonical_to_hf
from dba.param_shapes import param_shapes, tied_aliases
from dba.safetensors_stream import ITEMSIZE, as_dtype, st_dtype, write_streamed

REMOTE_DIR = Path(__file__).resolve().parent / "hf_remote"  # package data, never imported by dba
REMOTE_FILES = ("configuration_dba.py", "modeling_dba.py")
REMOTE_ARCHITECTURE = "DBAForCausalLM"
NATIVE_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
TORCH_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}
DTYPE_FLAGS = {"fp32": "F32", "bf16": "BF16", "fp16": "F16"}


def native_family(cfg: ModelConfig) -> tuple[str | None, list[str]]:
    """("llama" | "qwen2", []) when transformers' own Llama or Qwen2 computes this model exactly;
    (None, [what it has that they lack, ...]) otherwise."""
    why: list[str] = []
    if cfg.attn_mode == "decoupled":
        why.append("decoupled attention")
    elif cfg.qk_dim != cfg.v_dim:
        why.append(f"query/key width {cfg.qk_dim} != value width {cfg.v_dim}")
    if cfg.norm != "rmsnorm":
        why.append("LayerNorm")
    if cfg.learned_temp:
        why.append("learned temperature")
    if cfg.null_attn:
        why.append("null attention")
    if cfg.tie_qk:
        why.append("tied Q/K")
    if cfg.embed_dim != cfg.d_model:
        why.append(f"embedding bottleneck (embed_dim {cfg.embed_dim} != d_model {cfg.d_model})")
    if cfg.mlp != "swiglu":
        why.append(f"{cfg.mlp} MLP")
    if not cfg.rope:
        why.append("no RoPE")
    family = "llama"
    if cfg.qkv_bias and not cfg.out_bias:
        if cfg.mlp_bias:
            why.append("biases on q/k/v and the MLP but not on the output projection")
        elif cfg.head_dim * cfg.n_head != cfg.d_model:
            why.append(f"q/k/v biases (Qwen2) with head dim {cfg.head_dim} != d_model / n_head")
        family = "qwen2"
    elif cfg.out_bias and not cfg.qkv_bias:
        why.append("a bias on the output projection only")
    return (None, why) if why else (family, [])


def rope_json(cfg: ModelConfig) -> dict[str, Any]:
    """RoPE settings in every spelling transformers reads: top-level `rope_theta` and
    `rope_scaling` (the hub's and 4.x's; 5.x moves them into `rope_parameters`) and 5.x's own
    `rope_parameters` (with both present 5.x takes `rope_scaling` and adds the theta: the same)."""
    params: dict[str, Any] = {"rope_type": cfg.rope_type, "rope_theta": float(cfg.rope_base)}
    scaling = None
    if cfg.rope_type == "llama3":
        scaling = {"rope_type": "llama3", "factor": float(cfg.rope_factor),
                   "low_freq_factor": float(cfg.rope_low_freq_factor),
                   "high_freq_factor": float(cfg.rope_high_freq_factor),
                   "original_max_position_embeddings": int(cfg.rope_original_context)}
        params.update({k: v for k, v in scaling.items() if k != "rope_type"})
    return {"rope_theta": float(cfg.rope_base), "rope_scaling": scaling, "rope_parameters": params}


def native_config_json(cfg: ModelConfig, family: str, dtype: str) -> dict[str, Any]:
    """config.json of a Llama or Qwen2 (transformers' names; see native_family)."""
    out: dict[str, Any] = {
        "architectures": [NATIVE_ARCHITECTURES[family]], "model_type": family,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.block_size, "rms_norm_eps": float(cfg.norm_eps),
        "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": 0.0, "initializer_range": 0.02,
        "use_cache": True, **rope_json(cfg),
        "torch_dtype": TORCH_DTYPES[dtype], "dtype": TORCH_DTYPES[dtype],
    }
    if family == "llama":
        out.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias, pretraining_tp=1)
    else:  # Qwen2: q/k/v biases are part of the architecture; its head dim is d_model / n_head; no sliding window
        del out["head_dim"]
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layer)
    return out


def remote_config_json(cfg: ModelConfig, dtype: str) -> dict[str, Any]:
    """config.json of a custom-code export: every ModelConfig field under its own name."""
    return {"architectures": [REMOTE_ARCHITECTURE], "model_type": "dba",
            "auto_map": {"AutoConfig": "configuration_dba.DBAConfig",
                         "AutoModelForCausalLM": "modeling_dba.DBAForCausalLM"},
            **cfg.to_dict(), "use_cache": False, "tie_word_embeddings": cfg.tie_embeddings,
            "torch_dtype": TORCH_DTYPES[dtype], "dtype": TORCH_DTYPES[dtype]}


# ---- tokenizers ---------------------------------------------------------------------------------

def _bytes_to_unicode() -> dict[int, str]:
    """The byte-level alphabet of Hugging Face's ByteLevel pre-tokenizer (GPT-2's): printable
    bytes stand for themselves, the rest are shifted past 255."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def byte_tokenizer_json() -> dict[str, Any]:
    """dba's byte tokenizer (id = UTF-8 byte value) as a tokenizer.json: a byte-level BPE with the
    256 bytes and no merges, no special tokens."""
    level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
            "pre_tokenizer": level, "post_processor": None, "decoder": level,
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": False, "vocab": vocab, "merges": []}}


def _recorded_tokenizer_json(record: Mapping[str, Any], src: Path) -> Path | None:
    """The tokenizer.json an export records: its recorded path, else one beside the source (the
    same file: its sha256 must match the record's)."""
    path = str(record.get("path") or "tokenizer.json")
    beside = src if src.is_dir() else src.parent
    for c in dict.fromkeys([Path(path), beside / "tokenizer.json", beside / Path(path).name,
                            beside / (src.stem + ".tokenizer.json")]):
        if c.is_file() and (not record.get("sha256") or file_sha256(c) == record["sha256"]):
            return c
    return None


def tokenizer_files(metadata: Mapping[str, str] | None, src: Path, block_size: int,
                    vocab_size: int) -> tuple[dict[str, Callable[[Path], None]], str]:
    """{file name: writer(path)} for the tokenizer the source records, and a note on what was done."""
    raw = (metadata or {}).get("tokenizer")
    if not raw:
        return {}, "no tokenizer recorded (token ids in and out)"
    try:
        record = json.loads(raw)
    except ValueError:
        return {}, "the recorded tokenizer is unreadable: none written"
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": block_size,
                  "clean_up_tokenization_spaces": False}

    def write_json(d: dict) -> Callable[[Path], None]:
        return lambda p: p.write_text(json.dumps(d, ensure_ascii=False) + "\n", encoding="utf-8")

    name = record.get("name") if isinstance(record, dict) else None
    if isinstance(record, dict) and isinstance(record.get("vocab_size"), int) and record["vocab_size"] > vocab_size:
        return {}, (f"tokenizer: the recorded {name} tokenizer has {record['vocab_size']} ids, more than the model's "
                    f"{vocab_size}: none written")
    if name == "byte":
        return ({"tokenizer.json": write_json(byte_tokenizer_json()), "tokenizer_config.json": write_json(tok_config)},
                "tokenizer: dba's byte tokenizer, as a byte-level tokenizer.json")
    if name == "hf":
        found = _recorded_tokenizer_json(record, src)
        if found is None:
            return {}, f"tokenizer: the recorded {record.get('path')} is not on this machine: none written"
        files = {"tokenizer.json": lambda p: shutil.copyfile(found, p), "tokenizer_config.json": write_json(tok_config)}
        return files, f"tokenizer: {found}"
    if name == "tiktoken":
        return {}, (f"tokenizer: tiktoken:{record.get('encoding', 'gpt2')} is not written (its files are tiktoken's; "
                    f"the hub's 'gpt2' tokenizer is the same)")
    return {}, f"tokenizer {name!r} is not written"


# ---- the directory ------------------------------------------------------------------------------

def check_destination(dst: Path, *, overwrite: bool, src: Path | None = None) -> None:
    """One-line refusals before anything is read or written."""
    parent = dst.absolute().parent
    if not parent.is_dir():
        raise UserError(f"output directory {str(parent)!r} does not exist", 1)
    if dst.exists() and not dst.is_dir():
        raise UserError(f"{str(dst)!r} exists and is not a directory", 2)
    if dst.is_dir() and any(dst.iterdir()):
        if not overwrite:
            raise UserError(f"{str(dst)!r} already exists and is not empty (pass --overwrite to replace it)", 2)
        if not (dst / "config.json").is_file():
            raise UserError(f"--overwrite replaces a model directory only: {str(dst)!r} holds no config.json", 2)
        if src is not None and (src.absolute() == dst.absolute() or dst.absolute() in src.absolute().parents):
            raise UserError(f"{str(dst)!r} holds the source {str(src)!r}: write the export elsewhere", 2)


def write_directory(dst: Path, files: Mapping[str, Callable[[Path], None]]) -> None:
    """Write every file (name -> writer(path)) into a fresh directory beside `dst`, then rename it
    into place (replacing an existing `dst` whole)."""
    parent = dst.absolute().parent
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=parent))
    except OSError as e:
        raise UserError(f"cannot write in {str(parent)!r}: {os.strerror(e.errno) if e.errno else e}", 1) from None
    old = None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        for name, write in files.items():
            write(tmp / name)
        if dst.is_dir() and any(dst.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".old", dir=parent))
            os.rename(dst, old / "x")
        os.replace(tmp, dst)  # over an absent or empty directory
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and (old / "x").exists() and not dst.exists():
            os.rename(old / "x", dst)  # put the previous directory back
        raise UserError(f"cannot write {str(dst)!r}: {os.strerror(e.errno) if e.errno else e}", 1) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and (old / "x").exists() and not dst.exists():
            os.rename(old / "x", dst)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _copy_from(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)


def export(src: str | Path, dst: str | Path, *, dtype: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Write the Hugging Face directory `dst` for the weights at `src` (anything
    dba.weight_files.read_weights reads); returns what was written: kind ("native" | "custom"),
    architecture, family, why (custom: what transformers' classes lack), config, dtype, bytes,
    files, tokenizer note. `dtype`: fp32 | bf16 | fp16 (default: the weights')."""
    from dba.weight_files import read_weights

    src, dst = Path(src), Path(dst)
    check_destination(dst, overwrite=overwrite, src=src)
    cfg, state, info = read_weights(src)
    family, why = native_family(cfg)
    aliases = tied_aliases(cfg)
    names = [n for n in param_shapes(cfg) if n not in aliases]
    want = DTYPE_FLAGS[dtype] if dtype else None
    dtypes = {n: want or st_dtype(np.asarray(state[n])) for n in names}
    main = dtypes[names[0]] if len(set(dtypes.values())) == 1 else "F32"
    dtypes = dict.fromkeys(names, main)  # one dtype per directory (mixed sources: fp32, lossless)
    shapes = param_shapes(cfg)
    if family is not None:
        out_name = canonical_to_hf
        config = native_config_json(cfg, family, main)
        meta = {"format": "pt"}
    else:
        def out_name(n: str) -> str:
            return n
        config = remote_config_json(cfg, main)
        meta = {"format": "pt", "dba_config": cfg.to_json(), "converted_from": str(info.get("source", src))}
    entries = [(out_name(n), dtypes[n], shapes[n]) for n in names]
    by_out = {out_name(n): n for n in names}
    metadata = (info.get("metadata") or {}) if isinstance(info, dict) else {}
    tok_files, tok_note = tokenizer_files(metadata, src, cfg.block_size, cfg.vocab_size)
    if family is None and tok_files and metadata.get("tokenizer"):
        meta["tokenizer"] = metadata["tokenizer"]  # `dba sample --ckpt DIR/model.safetensors` speaks text

    def write_json(d: dict) -> Callable[[Path], None]:
        return lambda p: p.write_text(json.dumps(d, indent=2) + "\n")

    files: dict[str, Callable[[Path], None]] = {
        "config.json": write_json(config),
        "model.safetensors": lambda p: write_streamed(
            p, entries, lambda o: as_dtype(np.asarray(state[by_out[o]]), dtypes[by_out[o]]), meta),
    }
    if family is None:
        files["generation_config.json"] = write_json({"use_cache": False})
        for fname in REMOTE_FILES:
            files[fname] = functools.partial(_copy_from, REMOTE_DIR / fname)
    files.update(tok_files)
    write_directory(dst, files)
    total = sum(math.prod(shape) * ITEMSIZE[dt] for _, dt, shape in entries)
    return {"kind": "native" if family else "custom", "family": family,
            "architecture": NATIVE_ARCHITECTURES[family] if family else REMOTE_ARCHITECTURE, "why": why,
            "config": cfg, "dtype": main, "bytes": total, "tensors": len(entries), "files": sorted(files),
            "tokenizer": tok_note, "source": str(info.get("source", src))}
