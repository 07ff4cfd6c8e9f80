"""Periodic work of a training run, registered with an interval (`Run.add_hook(every=N)`).

After each optimizer step the run asks every hook whether it is due: at multiples of `every`
(0: never periodically), at the run's last step when `at_end`, and, once a stop signal has
arrived, only the hooks marked `on_stop` (the final log line). Hooks run in registration order.
`reads_state` marks work that reads the trained state (evaluation, analysis, checkpoints): before
it runs, the run checks for non-finite steps, so nothing is evaluated or saved after one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass
class Hook:
    name: str
    every: int
    fn: Callable[[int], object]
    at_end: bool = True
    on_stop: bool = False
    reads_state: bool = True
    syncs: bool = True  # fetches from the device (the loop resets its throughput window after)

    def due(self, step: int, last_step: int, stopping: bool) -> bool:
        if stopping:
            return self.on_stop
        if step == last_step:
            return self.at_end
        return self.every > 0 and step % self.every == 0


class Hooks:
    def __init__(self) -> None:
        self.hooks: list[Hook] = []

    def add(self, hook: Hook) -> Hook:
        if any(h.name == hook.name for h in self.hooks):
            raise ValueError(f"a hook named {hook.name!r} is already registered")
        if hook.every < 0:
            raise ValueError(f"hook {hook.name!r}: every must be >= 0, got {hook.every}")
        self.hooks.append(hook)
        return hook

    def due(self, step: int, last_step: int, stopping: bool) -> list[Hook]:
        return [h for h in self.hooks if h.due(step, last_step, stopping)]
