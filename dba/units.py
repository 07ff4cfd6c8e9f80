"""Byte counts as text: the one formatter every report, message and display uses."""

from __future__ import annotations

_SPEC_UNITS = ("B", "KB", "MB", "GB", "TB")
_IEC_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def human_bytes(n: float, style: str = "spec") -> str:
    """Divide by 1024 while >= 1024 and name the unit.

    style "spec" (SPEC §6, the KV-cache reports that must match v29's figures): units B, KB, MB,
    GB, TB; whole bytes, one decimal from 100 up, else two decimals; no space ("9.00MB").
    style "iec" (memory estimates and the dashboard): units B, KiB, MiB, GiB, TiB after a space;
    one decimal below GiB, two from GiB up ("64.0 KiB", "1.50 GiB").
    """
    if style not in ("spec", "iec"):
        raise ValueError(f"human_bytes style must be 'spec' or 'iec', got {style!r}")
    units = _SPEC_UNITS if style == "spec" else _IEC_UNITS
    x = float(n)
    i = 0
    while abs(x) >= 1024 and i < len(units) - 1:
        x /= 1024.0
        i += 1
    if i == 0:
        return f"{x:.0f}{'' if style == 'spec' else ' '}{units[0]}"
    if style == "iec":
        return f"{x:.2f} {units[i]}" if i >= 3 else f"{x:.1f} {units[i]}"
    return f"{x:.1f}{units[i]}" if abs(x) >= 100 else f"{x:.2f}{units[i]}"
