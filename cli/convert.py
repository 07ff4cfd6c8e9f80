"""`dba convert SRC DST`: move weights between dba's export, v29 `.pt` files and Hugging Face.

    dba convert HF_DIR model.safetensors        a Llama / Mistral / Qwen2 directory -> dba's export
    dba convert runs/x/best.safetensors m.pt     dba -> a v29 .pt (needs torch), and back
    dba convert runs/x OUT_DIR/                  dba -> a Hugging Face directory (transformers loads it)

SRC is a Hugging Face model directory (config.json naming LlamaForCausalLM, MistralForCausalLM or
Qwen2ForCausalLM, model.safetensors or its sharded index, tokenizer files), a v29 .pt, a
.safetensors export, a run directory, or a custom-code directory this command wrote. The destination format follows DST: .safetensors, .pt,
or a directory. Nothing is written on a mistake, and every file is written to a temporary name
and renamed.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from dba.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (__doc__ or "").split("\n\n")[0]
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = (__doc__ or "").split("\n\n", 1)[1]
    p.add_argument("src", help="a Hugging Face model directory, v29 best.pt/last.pt, a .safetensors export, "
                               "or a run directory")
    p.add_argument("dst", help="output: .safetensors (dba's export), .pt (v29 payload) or a directory (Hugging Face: "
                               "an existing directory or a name without .pt/.safetensors; transformers' own Llama/Qwen2 "
                               "where they compute the model, else dba's modeling code for trust_remote_code)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                   help="store the weights in this dtype (default: the source's; a bf16 model stays bf16)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace DST if it exists (a directory is replaced whole, and only a model directory: one "
                        "holding a config.json)")


def is_hf_dir(path: Path) -> bool:
    """A Hugging Face model directory: a config.json that names a model type or an architecture, or
    Hugging Face weight files (then a missing config.json is said as such)."""
    cfg = path / "config.json"
    if not path.is_dir():
        return False
    if not cfg.is_file():
        return any((path / n).exists() for n in ("model.safetensors", "model.safetensors.index.json",
                                                  "pytorch_model.bin", "pytorch_model.bin.index.json"))
    try:
        d = json.loads(cfg.read_text())
    except (ValueError, OSError):
        return True  # a broken config.json: the importer says so in one line
    return isinstance(d, dict) and ("architectures" in d or "model_type" in d)


# Names that say "a file" (of another format): refused rather than made a directory of that name.
FILE_SUFFIXES = (".pth", ".bin", ".ckpt", ".gguf", ".onnx", ".json", ".npz", ".npy", ".h5", ".msgpack", ".zip",
                 ".tar", ".gz", ".txt")


def is_directory_destination(dst: Path) -> bool:
    """DST names a Hugging Face directory: an existing directory, or a path without a .pt or
    .safetensors suffix (nor another file format's suffix)."""
    return dst.is_dir() or dst.suffix.lower() not in (".pt", ".safetensors", *FILE_SUFFIXES)


def is_dba_hf_export(path: Path) -> bool:
    """A custom-code Hugging Face directory written by `dba convert SRC DIR` (model_type dba)."""
    try:
        return (path / "model.safetensors").is_file() and json.loads((path / "config.json").read_text()).get(
            "model_type") == "dba"
    except (OSError, ValueError, AttributeError):
        return False


def run(args: argparse.Namespace) -> int:
    src, dst = Path(args.src), Path(args.dst)
    if is_dba_hf_export(src):  # dba's own custom-code export: its model.safetensors is dba's export
        src = src / "model.safetensors"
        args.src = str(src)
    if is_hf_dir(src):
        return _import_hf(src, dst, args)
    if src.is_dir() and (src / "config.json").is_file() is False and not any(src.iterdir()):
        raise UserError(f"{str(src)!r} is an empty directory")
    if src.is_dir() and not any(src.glob("*.safetensors")) and not any(src.glob("*.pt")):
        raise UserError(f"{str(src)!r} has no config.json (not a Hugging Face model directory) and no "
                        f"checkpoint (not a run directory)", 1)
    if is_directory_destination(dst):
        return _export_hf(src, dst, args)
    if dst.suffix not in (".pt", ".safetensors"):
        raise UserError(f"unsupported destination {str(dst)!r}: use a .pt or .safetensors name, or a directory "
                        f"(a Hugging Face model)")
    if dst.exists() and not args.overwrite:
        raise UserError(f"{str(dst)!r} already exists (pass --overwrite to replace it)")
    if not dst.parent.exists():
        raise UserError(f"output directory {str(dst.parent)!r} does not exist")
    from dba.weight_files import read_weights

    cfg, state, info = read_weights(args.src)
    if args.dtype:
        import numpy as np

        from dba.safetensors_stream import as_dtype

        state = {k: as_dtype(np.asarray(v), {"fp32": "F32", "bf16": "BF16", "fp16": "F16"}[args.dtype])
                 for k, v in state.items()}
    if dst.suffix == ".safetensors":
        from dba.weights import save_safetensors

        meta = {"converted_from": str(info["source"])}
        if info.get("step") is not None:
            meta["step"] = str(info["step"])
        save_safetensors(dst, cfg, state, meta)
    else:
        try:
            from torch_ref.weights_io import save_v29
        except ImportError:
            raise UserError("writing a v29 .pt needs PyTorch: pip install torch", 1) from None
        step = int(info.get("step") or 0)
        save_v29(dst, cfg, state, step=step)
    n = cfg.num_params()
    print(f"wrote {dst} ({cfg.attn_mode}, {n:,} parameters, {len(state)} tensors) from {info['source']}")
    return 0


def _import_hf(src: Path, dst: Path, args: argparse.Namespace) -> int:
    """A Hugging Face directory -> dba's export, streamed tensor by tensor with a progress bar."""
    if dst.suffix != ".safetensors":
        raise UserError(f"{str(dst)!r}: a Hugging Face model converts to a .safetensors export (dba's format)")
    if dst.exists() and not args.overwrite:
        raise UserError(f"{str(dst)!r} already exists (pass --overwrite to replace it)")
    if not dst.parent.is_dir():
        raise UserError(f"output directory {str(dst.parent)!r} does not exist")
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from dba.hf_config import model_config, read_config_json
    from dba.hf_import import convert
    from dba.param_shapes import param_shapes

    cfg0, _, _ = model_config(read_config_json(src), str(src))  # config mistakes before the bar
    sizes = {name: math.prod(shape) for name, shape in param_shapes(cfg0).items()}
    total = sum(sizes.values())
    console = Console(stderr=True)
    with Progress(TextColumn("[bold]convert"), BarColumn(), TextColumn("{task.completed:,.0f}/{task.total:,.0f} "
                  "parameters"), TimeRemainingColumn(), console=console, disable=not console.is_terminal) as bar:
        task = bar.add_task("", total=total)
        cfg, info = convert(src, dst, dtype=args.dtype,
                            on_tensor=lambda name, nbytes: bar.update(task, advance=sizes[name]))
    for note in info["notes"]:
        print(f"note: {note}")
    tok = f"; tokenizer {info['tokenizer']}" if info["tokenizer"] else "; no tokenizer.json (token ids in and out)"
    print(f"wrote {dst} ({info['family']}: {cfg.n_layer} layers, {cfg.n_head} heads / {cfg.n_kv_head} kv, "
          f"{cfg.num_params():,} parameters, {'/'.join(info['dtypes'])}, {info['bytes'] / 2**20:,.1f} MiB){tok}")
    return 0


def _export_hf(src: Path, dst: Path, args: argparse.Namespace) -> int:
    """dba's weights -> a Hugging Face directory (dba/hf_export.py)."""
    from dba.hf_export import check_destination, export

    check_destination(dst, overwrite=args.overwrite, src=src)  # before the weights are read
    info = export(src, dst, dtype=args.dtype, overwrite=args.overwrite)
    cfg = info["config"]
    if info["kind"] == "native":
        how = f"{info['architecture']}: transformers' own class loads it (AutoModelForCausalLM.from_pretrained)"
    else:
        how = (f"{info['architecture']} with its modeling code ({', '.join(info['why'])}): "
               f"AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True); generation there is uncached")
    print(f"wrote {dst}/ ({how}; {cfg.attn_mode}, {cfg.num_params():,} parameters, {info['tensors']} tensors, "
          f"{info['dtype']}, {info['bytes'] / 2**20:,.1f} MiB) from {info['source']}")
    print(info["tokenizer"])
    return 0
