"""`dba convert SRC DST`: move weights between a v29 `.pt` and the safetensors export.

SRC may be a v29 .pt, an export, or a run directory. The destination format follows DST's
suffix. Writing `.pt` needs torch (the file must load in v29, which is a torch script).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dba.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="v29 best.pt/last.pt, a .safetensors export, or a run directory")
    p.add_argument("dst", help="output file: .safetensors (project export) or .pt (v29 payload)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")


def run(args: argparse.Namespace) -> int:
    dst = Path(args.dst)
    if dst.suffix not in (".pt", ".safetensors"):
        raise UserError(f"unsupported destination {str(dst)!r}: use a .pt or .safetensors name")
    if dst.exists() and not args.overwrite:
        raise UserError(f"{str(dst)!r} already exists (pass --overwrite to replace it)")
    if not dst.parent.exists():
        raise UserError(f"output directory {str(dst.parent)!r} does not exist")
    from dba.weight_files import read_weights

    cfg, state, info = read_weights(args.src)
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
