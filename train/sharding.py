"""Device mesh and sharding rules for `dba train --mesh data=N,fsdp=M`.

JAX's SPMD partitioner does the distribution; this module only says how to lay things out:

- the mesh always has the two named axes `data` and `fsdp` (size 1 when not asked for), so one
  code path serves one device and many (no `--mesh` = a 1 x 1 mesh over the first device);
- batches (A, B, T) are split along B over both axes: every device holds B / (data*fsdp) rows,
  and `--batch-size` stays the global micro-batch whatever the mesh;
- parameters and optimizer state are split over `fsdp` by the logical-axis rules below (one
  place): each tensor names the logical axis of each dimension, and the first dimension in
  `FSDP_PRIORITY` whose size divides the fsdp size is split; 1-D and other small tensors
  (LayerNorms, temperatures, null keys) are replicated. The same rule applies to optimizer
  state, whose leaves carry the parameter's path (`.../mu/blocks/0/ff/w1/kernel`).

Only `dba.errors` is imported at module level, so flags can be checked before JAX starts.
"""

from __future__ import annotations

import math
from typing import Any

from dba.errors import UserError

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both

# Logical axes of each parameter dimension, by owning module (the path element before the leaf).
# Flax Linear kernels are (in, out); the embedding is (vocab, embed_dim).
_ATTN_IN = ("embed", "heads")  # projections d_model -> per-head widths
PARAM_AXES: dict[str, tuple[str, ...]] = {
    "tok_emb": ("vocab", "lexical"),
    "lm_head": ("vocab", "lexical"),  # an untied output head, laid out like the embedding
    "emb_in": ("lexical", "embed"),
    "emb_out": ("embed", "lexical"),
    "q_sem": _ATTN_IN, "k_sem": _ATTN_IN, "q_geo": _ATTN_IN, "k_geo": _ATTN_IN,
    "q_proj": _ATTN_IN, "k_proj": _ATTN_IN, "v_proj": _ATTN_IN,
    "out_proj": ("heads", "embed"),
    "w1": ("embed", "mlp"),
    "w3": ("mlp", "embed"),
    # w2 is (d_model, d_ff) for swiglu, (d_ff, d_model) for gelu: see logical_axes
}
# Which logical axis to split over `fsdp`, best first: the large dimensions (vocab, d_ff, the
# attention widths), then the residual width as a last resort. Under FSDP every weight is
# all-gathered before use, so which dimension is split changes only the collective's layout,
# not the maths; when no dimension divides the fsdp size the tensor is replicated (correct, it
# just does not shrink).
FSDP_PRIORITY = ("vocab", "mlp", "heads", "lexical", "embed")


# ---- --mesh -----------------------------------------------------------------------------------

def parse_mesh(text: str | None) -> dict[str, int]:
    """'data=4,fsdp=2' -> {'data': 4, 'fsdp': 2}; None, '' or '1' -> {} (one device).

    One size may be -1: "the remaining devices" (resolved by `resolve_mesh`).
    """
    t = "" if text is None else str(text).strip()
    if t in ("", "1", "none"):
        return {}
    out: dict[str, int] = {}
    for part in t.split(","):
        name, eq, size = part.strip().partition("=")
        name = name.strip()
        if not eq or not name:
            raise UserError(f"--mesh {text!r}: expected AXIS=SIZE pairs like 'data=4,fsdp=2'")
        if name not in MESH_AXES:
            raise UserError(f"--mesh {text!r}: unknown axis {name!r} (axes: {', '.join(MESH_AXES)}; "
                            "tensor parallelism is not implemented)")
        if name in out:
            raise UserError(f"--mesh {text!r}: axis {name!r} given twice")
        try:
            n = int(size)
        except ValueError:
            n = 0
        if n < 1 and n != -1:
            raise UserError(f"--mesh {text!r}: size of {name!r} must be a positive integer "
                            f"(or -1 for the remaining devices), got {size.strip()!r}")
        out[name] = n
    if list(out.values()).count(-1) > 1:
        raise UserError(f"--mesh {text!r}: at most one axis may be -1")
    return out


def mesh_text(axes: dict[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in axes.items() if v != 1) or "1"


def resolve_mesh(axes: dict[str, int], n_devices: int | None) -> dict[str, int]:
    """Full {'data': d, 'fsdp': f} with -1 resolved; UserError when it cannot use the devices.

    No axes = one device. With axes, the mesh must cover every device: a mesh over fewer would
    leave devices idle, which is never what a --mesh user meant.
    """
    full = {a: int(axes.get(a, 1)) for a in MESH_AXES}
    if not axes:
        return full
    given = math.prod(v for v in full.values() if v != -1)
    if n_devices is None:  # only the syntax can be checked yet
        return full
    shown = mesh_text(axes)
    if -1 in full.values():
        if n_devices % given:
            raise UserError(f"--mesh {shown}: {n_devices} devices cannot be split into groups of {given}")
        full = {a: (n_devices // given if v == -1 else v) for a, v in full.items()}
    elif given != n_devices:
        raise UserError(f"--mesh {shown}: the axes multiply to {given} but {n_devices} device"
                        f"{'s are' if n_devices != 1 else ' is'} available (jax.device_count())")
    return full


def batch_ways(axes: dict[str, int]) -> int:
    return math.prod(v for k, v in axes.items() if k in BATCH_AXES and v > 0)


def check_batch(axes: dict[str, int], batch_size: int, what: str = "--batch-size") -> None:
    ways = batch_ways(axes)
    if ways > 1 and batch_size % ways:
        split = " x ".join(f"{k}={v}" for k, v in axes.items() if k in BATCH_AXES and v > 1)
        raise UserError(f"{what} {batch_size} is not divisible by the mesh's batch axes ({split} = {ways}); "
                        f"it is the global batch, split evenly over those devices")


def make_mesh(axes: dict[str, int], devices: Any = None):
    """A `jax.sharding.Mesh` with axes (data, fsdp) in Auto mode (the partitioner decides
    collectives; jax.make_mesh would default to Explicit sharding-in-types)."""
    import jax
    from jax.sharding import AxisType

    devices = list(jax.devices() if devices is None else devices)
    full = resolve_mesh(axes, len(devices)) if axes else {a: 1 for a in MESH_AXES}
    shape = tuple(full[a] for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices[:math.prod(shape)])


def mesh_shape(mesh) -> dict[str, int]:
    return {str(k): int(v) for k, v in mesh.shape.items()}


# ---- the logical-axis rules -----------------------------------------------------------------------

def path_names(path) -> list[str]:
    """Key path -> names, without NNX's trailing `.value`."""
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
    while out and out[-1] == "value":
        out.pop()
    return out


def logical_axes(names: list[str], ndim: int, mlp: str = "swiglu") -> tuple[str | None, ...]:
    """The logical axis of each dimension of the tensor at `names` (None: never split)."""
    owner = names[-2] if len(names) >= 2 else ""
    if owner == "w2":
        axes = ("embed", "mlp") if mlp == "swiglu" else ("mlp", "embed")
    else:
        axes = PARAM_AXES.get(owner)
    if axes is None or len(axes) != ndim:
        return (None,) * ndim
    return axes


def spec_for(names: list[str], shape: tuple[int, ...], fsdp: int, mlp: str = "swiglu"):
    """PartitionSpec of one parameter (or optimizer-state leaf) on a mesh with this fsdp size."""
    from jax.sharding import PartitionSpec as P

    if fsdp <= 1 or len(shape) < 2:
        return P()
    axes = logical_axes(names, len(shape), mlp)
    for logical in FSDP_PRIORITY:
        for dim, a in enumerate(axes):
            if a == logical and shape[dim] % fsdp == 0:
                return P(*(("fsdp" if d == dim else None) for d in range(len(shape))))
    return P()


def tree_shardings(tree: Any, mesh, mlp: str = "swiglu") -> Any:
    """NamedShardings for every array leaf of `tree` (params, optimizer state, abstract or not)."""
    import jax
    from jax.sharding import NamedSharding

    fsdp = int(mesh.shape["fsdp"])

    def one(path, x):
        return NamedSharding(mesh, spec_for(path_names(path), tuple(getattr(x, "shape", ())), fsdp, mlp))

    return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh):
    """(A or N, B, T) arrays: B split over (data, fsdp)."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    return NamedSharding(mesh, P(None, BATCH_AXES, None))


def replicated(mesh):
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    return NamedSharding(mesh, P())


def local_rows(sharding, global_batch: int) -> slice:
    """The rows (dim 1) of a (A, B, T) batch this process's devices hold: each host samples and
    transfers only those (`jax.make_array_from_process_local_data`)."""
    idx = sharding.addressable_devices_indices_map((1, int(global_batch), 1))
    spans = sorted({(s[1].start or 0, global_batch if s[1].stop is None else s[1].stop) for s in idx.values()})
    start, stop = spans[0][0], spans[-1][1]
    if sum(b - a for a, b in spans) != stop - start:  # make_mesh orders each host's devices together
        raise UserError(f"this process's batch rows are not contiguous ({spans}); use a mesh whose "
                        f"batch axes group each host's devices", 1)
    return slice(start, stop)


def per_device_bytes(tree: Any) -> int:
    """Bytes of `tree`'s arrays held by one device (the first leaf's first shard's): what FSDP
    shrinks to ~1/fsdp while replication keeps it whole."""
    import jax

    total, dev = 0, None
    for x in jax.tree.leaves(tree):
        shards = getattr(x, "addressable_shards", None)
        if not shards:
            total += int(getattr(x, "nbytes", 0))
            continue
        dev = shards[0].device if dev is None else dev
        total += sum(s.data.nbytes for s in shards if s.device == dev)
    return int(total)
