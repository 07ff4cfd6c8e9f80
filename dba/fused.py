"""`--kv-fused`: which decode-attention kernel reads the quantized cache (framework-free).

v29 chose among its fused Triton decode kernels with `--kv-fused auto|none|triton1pass|triton2pass`.
dba has one kernel per framework, each behind the framework's own cached decode:
- `pallas` (JAX, jax_model/pallas_decode.py) and `triton` (PyTorch, torch_ref/triton_decode.py):
  read the stored blocks (codes, fp16 scales, the fp16 window), dequantize in registers and run
  an online softmax split over the key axis, with a second pass merging the splits;
  `triton1pass` / `triton2pass` force the torch kernel's single pass / split-K form (`triton`
  picks by length).
- `none`: the framework's cached attention (`cached_attend`: dequantize a block, then attend).
- `auto` (default): the kernel where the device runs it natively (a GPU), else `none`.

An explicit kernel on a CPU runs in its interpreter (Pallas `interpret=True`,
`TRITON_INTERPRET=1`): slow, for checking correctness, and said so. A policy or model the kernel
does not support falls back to `none` with a note, never silently.
"""

from __future__ import annotations

from dba.errors import UserError

FUSED_CHOICES = ("auto", "none", "pallas", "triton", "triton1pass", "triton2pass")
_KERNEL_OF = {"jax": ("pallas",), "torch": ("triton", "triton1pass", "triton2pass")}


def resolve_fused(choice: str, backend: str, on_gpu: bool) -> tuple[str, bool]:
    """(kernel: 'none' | 'pallas' | 'triton' | 'triton1pass' | 'triton2pass', interpret) for
    `--kv-fused choice` on `backend` ('jax' | 'torch'); `on_gpu`: the backend runs on a GPU."""
    if choice not in FUSED_CHOICES:
        raise UserError(f"--kv-fused {choice!r}: expected one of {', '.join(FUSED_CHOICES)}")
    if choice == "none":
        return "none", False
    if choice == "auto":
        return (_KERNEL_OF[backend][0], False) if on_gpu else ("none", False)
    if choice not in _KERNEL_OF[backend]:
        other = "torch" if backend == "jax" else "jax"
        raise UserError(f"--kv-fused {choice} is the {other} backend's kernel; with --backend {backend} use "
                        f"{' or '.join(_KERNEL_OF[backend])} (or auto/none)")
    return choice, not on_gpu
