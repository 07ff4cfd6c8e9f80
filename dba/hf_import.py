"""`dba convert HF_DIR DST.safetensors`: a local Hugging Face Llama / Mistral / Qwen2 directory
into dba's export (framework-free; the result loads with torch_ref.load and jax_model.load).

Nothing but names changes: transformers' Llama family keeps Linear weights as [out, in] and
rotates with the half-split RoPE layout, exactly dba's canonical form (SPEC §8), so the tensors
are copied, renamed (dba.hf_config.hf_to_canonical), one at a time: the source files' headers are
checked by safetensors, then each tensor is read (a plain read at its offsets), written and
dropped before the next, so converting a model needs about one tensor's worth of memory, not
the model's (`dba bench convert`: 541 MiB peak for Llama-3.2-1B's 2.3 GiB). A bf16 source stays bf16
unless `dtype` says otherwise. Every tensor's name, shape and dtype is checked against the
config before a byte is written; the tokenizer.json travels beside the export
(`<DST stem>.tokenizer.json`) and is recorded in its metadata, so `dba sample --prompt` speaks text.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dba.config import ModelConfig
from dba.errors import UserError
from dba.hf_config import hf_to_canonical, model_config, read_config_json
from dba.param_shapes import param_shapes
from dba.safetensors_stream import DTYPES, ITEMSIZE, as_dtype, write_streamed
from dba.weights import CONFIG_METADATA_KEY, validate_layout

DTYPE_FLAGS = {"fp32": "F32", "bf16": "BF16", "fp16": "F16"}


def weight_files(hf_dir: Path) -> dict[str, Path]:
    """{tensor name: the .safetensors file holding it}: model.safetensors, or the shards listed
    by model.safetensors.index.json (each must exist)."""
    single, index = hf_dir / "model.safetensors", hf_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise UserError(f"{str(index)!r} is not a safetensors index (no weight_map: {e})", 1) from None
        files = {name: hf_dir / f for name, f in weight_map.items()}
        missing = sorted({str(p.name) for p in files.values() if not p.is_file()})
        if missing:
            raise UserError(f"{str(hf_dir)!r}: shard {missing[0]} listed in model.safetensors.index.json is missing"
                            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""), 1)
        return files
    if single.is_file():
        return {"": single}  # every tensor of the one file
    if any(hf_dir.glob("*.bin")):
        raise UserError(f"{str(hf_dir)!r} holds PyTorch .bin weights only; dba reads safetensors (save the model "
                        f"with transformers' save_pretrained(..., safe_serialization=True))", 1)
    raise UserError(f"{str(hf_dir)!r} has no model.safetensors or model.safetensors.index.json", 1)


class _Sources:
    """The source files, their headers checked by safetensors (sizes, offsets, dtypes) before any
    tensor is read. Each tensor is then read with a plain file read at its offsets, not through a
    memory map: mapped pages would stay resident, so converting would hold the whole model in
    memory; read this way the process holds one tensor at a time."""

    def __init__(self, files: dict[str, Path]):
        from safetensors import SafetensorError, safe_open

        self.where: dict[str, Path] = {}
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}  # dtype, shape, begin, end
        for p in sorted(set(files.values())):
            try:
                with safe_open(str(p), framework="numpy") as h:  # validates the header against the file
                    names = list(h.keys())
                header, start = _header(p)
            except (SafetensorError, OSError, ValueError) as e:
                raise UserError(f"cannot read {str(p)!r}: {_first_line(e)}", 1) from None
            for name in names:
                if files.get("") == p or files.get(name) == p:
                    e = header[name]
                    b, end = e["data_offsets"]
                    self.where[name] = p
                    self.entries[name] = (e["dtype"], tuple(e["shape"]), start + b, start + end)
        listed = [n for n in files if n]
        absent = [n for n in listed if n not in self.where]
        if absent:
            raise UserError(f"tensor {absent[0]!r} is listed in the index but not in {files[absent[0]].name}", 1)

    def layout(self, name: str) -> tuple[tuple[int, ...], str]:
        dtype, shape, _, _ = self.entries[name]
        return shape, dtype

    def tensor(self, name: str) -> np.ndarray:
        dtype, shape, begin, end = self.entries[name]
        try:
            with open(self.where[name], "rb") as f:
                f.seek(begin)
                buf = f.read(end - begin)
        except OSError as e:
            raise UserError(f"cannot read tensor {name!r} from {self.where[name].name}: {e}", 1) from None
        if len(buf) != end - begin:
            raise UserError(f"{self.where[name].name} ends inside tensor {name!r}", 1)
        return np.frombuffer(buf, dtype=np_dtype(dtype)).reshape(shape)

    def close(self) -> None:
        self.entries.clear()


def _header(path: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's header (already validated by safetensors) and where its data starts."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


def np_dtype(st: str) -> np.dtype:
    if st == "BF16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return DTYPES[st]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def convert(hf_dir: str | Path, dst: str | Path, *, dtype: str | None = None,
            on_tensor: Callable[[str, int], None] | None = None) -> tuple[ModelConfig, dict[str, Any]]:
    """Write dba's export of the Hugging Face model in `hf_dir` to `dst`; (config, info: family,
    notes, dtypes, bytes, tokenizer path)."""
    hf_dir, dst = Path(hf_dir), Path(dst)
    hf = read_config_json(hf_dir)
    cfg, family, notes = model_config(hf, str(hf_dir))
    sources = _Sources(weight_files(hf_dir))
    try:
        plan: dict[str, str] = {}  # canonical name -> source name
        for name in sources.where:
            ours = hf_to_canonical(name)
            if ours is None or (ours == "lm_head.weight" and cfg.tie_embeddings):
                continue  # a cached RoPE buffer; a tied head's copy of the embedding
            if ours in plan:
                raise UserError(f"{str(hf_dir)!r}: two tensors map to {ours!r} ({plan[ours]}, {name})", 1)
            plan[ours] = name
        layout = {ours: sources.layout(src) for ours, src in plan.items()}
        validate_layout(cfg, layout, f"{hf_dir.name} ({family})")  # names, shapes, float dtypes: one line each
        want = DTYPE_FLAGS.get(dtype) if dtype else None
        entries = [(n, want or layout[n][1], layout[n][0]) for n in param_shapes(cfg)]
        tokenizer = _tokenizer(hf_dir, dst)
        meta = {CONFIG_METADATA_KEY: cfg.to_json(), "format": "dba-canonical-v1", "converted_from": str(hf_dir),
                "hf_architecture": str(hf["architectures"][0])}
        if tokenizer is not None:
            meta["tokenizer"] = json.dumps(tokenizer[1])
        try:
            write_streamed(dst, entries, lambda n: as_dtype(sources.tensor(plan[n]), want or layout[n][1]), meta,
                           on_tensor)
        except BaseException:
            if tokenizer is not None:
                tokenizer[0].unlink(missing_ok=True)
            raise
    finally:
        sources.close()
    total = sum(math.prod(shape) * ITEMSIZE[dt] for _, dt, shape in entries)
    return cfg, {"family": family, "notes": notes, "bytes": total, "dtypes": sorted({dt for _, dt, _ in entries}),
                 "tokenizer": None if tokenizer is None else str(tokenizer[0])}


def _tokenizer(hf_dir: Path, dst: Path) -> tuple[Path, dict[str, Any]] | None:
    """tokenizer.json copied beside the export (`<stem>.tokenizer.json`, written to a temporary
    name and renamed) and its record; None when the directory has none."""
    src = hf_dir / "tokenizer.json"
    if not src.is_file():
        return None
    from dba.data import tokenizer_record

    out = dst.with_name(dst.stem + ".tokenizer.json")
    tmp = out.with_name(out.name + ".tmp")
    try:
        shutil.copyfile(src, tmp)
        tmp.replace(out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {str(out)!r}: {e}", 1) from None
    return out, tokenizer_record(str(out))
