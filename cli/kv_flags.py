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


def checked_kv_fused(choice: str, kv_fused: str, backend: str, model, policy, batch: int, max_len: int,
                     decode_block: int) -> str:
    """The mode to decode this shape with: `auto`'s kernel only once one decode step with it has
    matched the cached attention here (dba/kernel_check.py: else "none", with one warning, and
    the verdict remembered); an explicit choice as given."""
    from dba.kernel_check import checked_kernel, shape_key

    if choice != "auto" or kv_fused == "none":
        return kv_fused
    if backend == "torch":
        import torch

        from torch_ref.decode import kernel_disagreement

        dev = model.device
        device = torch.cuda.get_device_name(dev) if dev.type == "cuda" else str(dev.type)
    else:
        import jax

        from jax_model.decode import kernel_disagreement

        device = str(jax.devices()[0].device_kind)
    key = shape_key(backend, device, kv_fused, model.cfg, policy, batch, max_len, decode_block)
    return checked_kernel(choice, kv_fused, key,
                          lambda: kernel_disagreement(model, policy, batch, max_len, decode_block, kv_fused))
