"""SIGINT/SIGTERM during training: set a flag; the run saves `last` and stops after the step."""

from __future__ import annotations

import signal
import threading
from typing import Any, ClassVar

EXIT_CODES = {"complete": 0, "already_complete": 0, "sigint": 130, "sigterm": 143, "nonfinite": 1, "error": 1}


class StopSignal:
    """`reason` becomes 'sigint' / 'sigterm' once a signal arrived (and, multi-process, once every
    process agreed on it); a second signal aborts at once (KeyboardInterrupt)."""

    _CODES: ClassVar[dict[str, int]] = {"sigint": 1, "sigterm": 2}

    def __init__(self, shared: bool = False):
        self.reason: str | None = None
        # Multi-process: a signal may reach one host only, and a process that stopped alone would
        # hang the others in the next collective; it becomes `reason` when all agree (`sync`).
        self.shared = shared
        self.pending: str | None = None
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, name in ((signal.SIGINT, "sigint"), (signal.SIGTERM, "sigterm")):
            self._old[sig] = signal.getsignal(sig)
            signal.signal(sig, lambda signum, frame, name=name: self._received(name))

    def _received(self, name: str) -> None:
        if self.reason is not None or self.pending is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        if self.shared:
            self.pending = name
        else:
            self.reason = name
        print(f"\n{name.upper()} received: saving the last checkpoint and stopping "
              f"(send again to abort without saving)", flush=True)

    @property
    def requested(self) -> bool:
        """A signal arrived here (agreed or not yet)."""
        return self.reason is not None or self.pending is not None

    def sync(self) -> None:
        """Multi-process: adopt a signal any process received (a collective: all call it)."""
        if not self.shared or self.reason is not None:
            return
        from train.distributed import agree

        code = agree(self._CODES.get(self.pending, 0))
        if code:
            self.reason = {v: k for k, v in self._CODES.items()}[code]

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()
