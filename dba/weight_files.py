"""The weights file behind a user-given path, and reading it with no framework: a v29 `.pt`
(dba.torchfile), a safetensors export, or a run directory holding either."""

from __future__ import annotations

from pathlib import Path

from dba.errors import UserError

WEIGHT_SUFFIXES = (".pt", ".safetensors")
# A run directory: our exports first (they carry the resolved config), then v29's files.
RUN_DIR_CANDIDATES = ("best.safetensors", "last.safetensors", "best.pt", "last.pt")


def resolve_weights_file(path: str | Path) -> Path:
    """A v29 `.pt`, a `.safetensors` export, or a run directory holding one (best, else last)."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"checkpoint not found: {str(p)!r}", 1)
    if p.is_dir():
        for name in RUN_DIR_CANDIDATES:
            if (p / name).is_file():
                return p / name
        raise UserError(f"{str(p)!r} holds no checkpoint (looked for {', '.join(RUN_DIR_CANDIDATES)})", 1)
    if p.suffix not in WEIGHT_SUFFIXES:
        raise UserError(f"unsupported checkpoint {str(p)!r}: expected .pt, .safetensors or a run directory", 2)
    if p.stat().st_size == 0:
        raise UserError(f"checkpoint {str(p)!r} is empty", 1)
    return p


def read_weights(path: str | Path, load_payload=None):
    """(config, canonical numpy state, info) from a v29 .pt, a .safetensors export or a run dir,
    with no framework: the .pt is read by dba.torchfile's weights-only reader unless
    `load_payload(path)` is given (torch_ref passes torch.load with weights_only=True)."""
    from dba.v29 import read_v29_checkpoint
    from dba.weights import load_safetensors

    file = resolve_weights_file(path)
    if file.suffix == ".safetensors":
        cfg, state, meta = load_safetensors(file)
        info = {"source": str(file), "format": "safetensors", "metadata": meta, "step": meta.get("step")}
        return cfg, state, info
    return read_v29_checkpoint(file, load_payload)
