"""Flag groups shared by several commands (v29's names, so seed command lines run as written)."""

from __future__ import annotations

import argparse

from dba.flags import add_flags
from dba.kvspec import KV_FLAGS


def add_kv_arguments(p: argparse.ArgumentParser) -> None:
    """v29's KV-cache policy flags (dba.kvspec.KV_FLAGS); read them back with
    `KVPolicy.from_flags(vars(args))`."""
    add_flags(p.add_argument_group("KV cache policy (v29 flags)"), KV_FLAGS)


def add_kv_fused_argument(p: argparse.ArgumentParser) -> None:
    from dba.fused import FUSED_CHOICES

    p.add_argument("--kv-fused", choices=FUSED_CHOICES, default="auto",
                   help="decode kernel over the quantized cache: pallas (jax) / triton, triton1pass, triton2pass "
                        "(torch) read the stored blocks in one fused kernel; none = the framework's cached "
                        "attention; auto = the kernel on a GPU, else none. An explicit kernel on a CPU runs in "
                        "its interpreter (slow; for checking)")


def resolve_kv_fused(choice: str, backend: str, device=None) -> tuple[str, str]:
    """`--kv-fused choice` for `backend` (torch: a model on `device`), by that framework's
    `resolve_kv_fused`: (the mode to pass as `kv_fused` to generate / score_policy /
    decode_step_seconds, what runs for the info line)."""
    if backend == "torch":
        from torch_ref.triton_decode import resolve_kv_fused as resolve_torch

        return resolve_torch(choice, device)
    from jax_model.pallas_decode import resolve_kv_fused as resolve_jax

    return resolve_jax(choice)
