"""`--kv-fused auto` is safe by default: before a fused decode kernel serves a shape for the first
time, one decode step runs with the kernel and with the framework's cached attention on the same
cache, and the kernel is used only when the two agree (framework-free; the backends' decode
modules run the step: `jax_model.decode.kernel_disagreement`, `torch_ref.decode.kernel_disagreement`).

A kernel that raises (a lowering error on a new GPU, an unsupported shape) or returns different
logits falls back to the cached attention with one warning naming why, and the verdict is kept
in a small JSON file (`~/.cache/dba/kernel_checks.json`, or `$DBA_KERNEL_CHECKS`), so later runs
skip the kernel for that shape without trying it again; a shape that passed is not checked again
either. The key names the framework, the device, the kernel, the model's attention shape, the
cache policy, the batch, the cache length and the decode block. An explicit `--kv-fused KERNEL`
is the user's choice and is never second-guessed. Deleting the file checks everything again.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

# |kernel - cached attention| over max(1, |logits|): both read the same stored blocks and differ
# only in summation order (~1e-6 in fp32); a wrong kernel is off by the logits' own scale
TOLERANCE = 1e-3


def checks_path() -> Path:
    env = os.environ.get("DBA_KERNEL_CHECKS")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dba" / "kernel_checks.json"


def shape_key(framework: str, device: str, kernel: str, cfg, policy, batch: int, max_len: int,
              decode_block: int) -> str:
    """A readable key: the kernel, device and shape, with a short hash of the attention config."""
    attn = {k: getattr(cfg, k, None) for k in ("attn_mode", "n_head", "d_model", "attn_dim", "sem_dim", "geo_dim",
                                               "kv_head", "decoupled_kv_head", "null_attn", "tie_qk", "rope")}
    digest = hashlib.sha256(json.dumps(attn, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{framework}|{device}|{kernel}|{digest}|{policy}|b{batch}|len{max_len}|blk{decode_block}"


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # none yet, or unreadable: check again (and rewrite it)
    return data if isinstance(data, dict) else {}


def _write(path: Path, data: dict[str, Any]) -> None:
    """Atomically (a reader never sees half a file); a cache that cannot be written is not an
    error: the check simply runs again next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass


def checked_kernel(choice: str, mode: str, key: str, disagreement: Callable[[], str | None],
                   warn: Callable[[str], None] | None = None) -> str:
    """The mode to decode with: `mode` (a kernel `choice` resolved to) when `choice` is an
    explicit kernel or "none", or when the kernel agrees with the cached attention on this shape
    (`disagreement()` returns None; it runs once per shape, ever); else "none", with one warning."""
    if choice != "auto" or mode == "none":
        return mode
    warn = warn or (lambda line: print(line, file=sys.stderr, flush=True))
    path = checks_path()
    seen = _read(path).get(key)
    if isinstance(seen, dict) and "ok" in seen:
        if seen["ok"]:
            return mode
        warn(f"warning: --kv-fused auto: {mode} failed its check for this shape earlier ({seen.get('why')}); "
             f"decoding with the cached attention (delete {path} to check again)")
        return "none"
    why = disagreement()
    data = _read(path)  # again: another process may have added verdicts meanwhile
    data[key] = {"ok": why is None, "why": why}
    _write(path, data)
    if why is None:
        return mode
    warn(f"warning: --kv-fused auto: {mode} disagrees with the cached attention on this shape ({why}); "
         f"decoding with the cached attention, and later runs skip it (verdict in {path})")
    return "none"


def disagreement(run: Callable[[str], Any], mode: str, to_numpy: Callable[[Any], Any]) -> str | None:
    """Why the kernel `mode` cannot be trusted on a shape, or None: `run(kv_fused)` decodes the
    same tokens through the same cache policy and returns the logits."""
    import numpy as np

    try:
        got = np.asarray(to_numpy(run(mode)), np.float64)
    except Exception as e:  # noqa: BLE001 - any failure of the kernel is a reason not to use it
        first = (str(e).strip().splitlines() or [""])[0][:200]
        return f"it raised {type(e).__name__}: {first}"
    want = np.asarray(to_numpy(run("none")), np.float64)
    if not np.isfinite(got).all():
        return "its logits are not finite"
    err = float(np.abs(got - want).max() / max(1.0, float(np.abs(want).max())))
    if err > TOLERANCE:
        return f"max |Δ logits| {err:.1e} of their scale, over {TOLERANCE:g}"
    return None
