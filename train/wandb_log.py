"""`dba train --wandb`: the run's records to Weights & Biases, beside train.jsonl.

The flags are v29's (`WANDB_FLAGS`, typed as `WandbConfig`); the sink (`start_wandb` ->
`WandbLog`) is fed by the framework-free loop (train/run.py), so both backends log the same way,
and only by the writer process: one W&B run per training run, however many hosts.

What goes where (the same records as train.jsonl):
    meta                         the W&B run's config (without `flags`, the same as `args`)
    train / eval / analysis      history rows at step = the train step, keys `<event>/<field>` as
                                 in TensorBoard (every number but `step` and `time`; `*_by_layer`
                                 lists as `<event>/<field>/<layer>`)
    analysis.png                 an image `analysis_png` at each step it is drawn (evaluations, end)
    done                         the run summary, keys `done/<field>`

W&B is never worth a failed run: a missing package, an `init` that raises, a `log` that raises
are one warning line each, and the run goes on without W&B (it stops trying after a failure).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from dba.errors import UserError
from dba.flags import Flag, field_default
from dba.runlog import event_kind

MODES = ("online", "offline", "disabled")
HISTORY_EVENTS = ("train", "eval", "analysis")
_NOT_LOGGED = {"type", "event", "step", "time"}
IMAGE_KEY = "analysis_png"
_RESERVED = {"project": "/\\#?%:", "id": ":;,#?/'"}  # what W&B refuses in a project name and a run id


@dataclass(frozen=True)
class WandbConfig:
    """The --wandb* flags. Only --wandb turns W&B on (as in v29); `--wandb-mode disabled` turns it
    off again (e.g. for a resumed run whose flags had --wandb)."""

    wandb: bool = False
    project: str = "experiments"  # v29's default
    entity: str | None = None
    name: str | None = None  # default: the run directory's name (v29)
    group: str | None = None
    tags: str | None = None  # comma-separated (v29)
    mode: str | None = None  # None: $WANDB_MODE, else online
    id: str | None = None

    def __post_init__(self) -> None:
        if self.mode is not None and self.mode not in MODES:
            raise UserError(f"--wandb-mode {self.mode!r}: expected one of {', '.join(MODES)}")
        for field, limit in (("project", 128), ("id", 64)):
            value = getattr(self, field)
            if value is None:
                continue
            bad = sorted(set(value) & set(_RESERVED[field]))
            if not value.strip() or value != value.strip() or bad or len(value) > limit:
                why = (f"W&B refuses {' '.join(bad)} in it" if bad else f"more than {limit} characters"
                       if len(value) > limit else "empty or padded with spaces")
                raise UserError(f"--wandb-{field} {value!r}: {why}")
        self.tag_list  # noqa: B018 (checks the tags)

    @property
    def tag_list(self) -> list[str]:
        """--wandb-tags split at commas (blanks dropped, as v29 did); W&B takes 1-64 characters each."""
        tags = [t.strip() for t in (self.tags or "").split(",") if t.strip()]
        long = [t for t in tags if len(t) > 64]
        if long:
            raise UserError(f"--wandb-tags: tag {long[0]!r} is longer than W&B's 64 characters")
        return tags

    @property
    def enabled(self) -> bool:
        return bool(self.wandb) and self.mode != "disabled"


def _flag(name: str, kind: str, help: str, choices: tuple | None = None) -> Flag:
    field = name.removeprefix("wandb_")
    return Flag(name, kind, field_default(WandbConfig, field), help, choices, "wandb", field)


WANDB_FLAGS: list[Flag] = [
    _flag("wandb", "bool", "log the run's records to Weights & Biases (train/eval/analysis history, config, "
          "summary, analysis.png), from the writer process; needs wandb: pip install 'dba[wandb]'"),
    _flag("wandb_project", "str", "W&B project"),
    _flag("wandb_entity", "str", "W&B entity (team or user; default: your W&B default)"),
    _flag("wandb_name", "str", "W&B run name (default: the run directory's name)"),
    _flag("wandb_group", "str", "W&B group"),
    _flag("wandb_tags", "str", "W&B tags, comma-separated: 'a,b'"),
    _flag("wandb_mode", "str", "online; offline (kept under <run>/wandb for `wandb sync`); disabled (nothing is "
          "logged, e.g. a resumed --wandb run). Default: $WANDB_MODE, else online", MODES),
    _flag("wandb_id", "str", "W&B run id to log to (created if new, continued if it exists); --resume reuses the "
          "run's recorded id without it"),
]
assert {f.attr for f in WANDB_FLAGS} == {f.name for f in dataclasses.fields(WandbConfig)}


def history_row(rec: dict[str, Any]) -> dict[str, Any]:
    """The W&B history values of a train/eval/analysis record."""
    kind, row = event_kind(rec), {}
    for k, v in rec.items():
        if k in _NOT_LOGGED:
            continue
        if _number(v):
            row[f"{kind}/{k}"] = v
        elif k.endswith("_by_layer") and isinstance(v, list):
            row.update({f"{kind}/{k}/{layer}": x for layer, x in zip(rec.get("layers") or (), v) if _number(x)})
    return row


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _why(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [""])[0][:200]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def start_wandb(cfg: WandbConfig, *, out_dir: str | Path, name: str, config: dict[str, Any],
                resume_id: str | None, say: Callable[[str], None]) -> "WandbLog | None":
    """The W&B run of a training run, or None (not asked for, or it could not start: one line said
    why). `resume_id`: the id the resumed run recorded, used unless --wandb-id is given."""
    if not cfg.enabled:
        return None
    try:
        import wandb
    except ImportError:
        say("warning: --wandb: the wandb package is not installed (pip install 'dba[wandb]'); "
            "training continues without W&B")
        return None
    run_id = cfg.id or resume_id
    try:
        # silent: W&B's chatter is replaced by the one line below (set up front too, or its login
        # line shows); console off: its capture of stdout would wrap the live display;
        # create_new: never log into another active run.
        wandb.setup(settings=wandb.Settings(silent=True))
        run = wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name or name, group=cfg.group,
                         tags=cfg.tag_list or None, dir=str(out_dir), mode=cfg.mode, config=config, id=run_id,
                         resume="allow" if run_id else None, reinit="create_new",
                         settings=wandb.Settings(silent=True, console="off"))
        if getattr(run, "disabled", False):  # WANDB_MODE=disabled without --wandb-mode
            say("W&B: disabled by WANDB_MODE; nothing is logged")
            return None
        offline = run.settings.mode == "offline"  # (an offline run has no url to ask for)
        where = f"offline; upload it with: wandb sync {run.settings.sync_dir}" if offline else run.url
    except Exception as e:  # noqa: BLE001 (no W&B problem may stop training)
        say(f"warning: --wandb: W&B did not start ({_why(e)}); training continues without W&B")
        return None
    say(f"W&B: run {run.id}{' (continued)' if run_id else ''}, {where}")
    return WandbLog(wandb, run, say)


class WandbLog:
    """One W&B run fed the run's records. After a failure it says so once and logs nothing more."""

    def __init__(self, module: Any, run: Any, say: Callable[[str], None]):
        self.module, self.run, self.say = module, run, say
        self.id = str(run.id)

    def event(self, rec: dict[str, Any]) -> None:
        """A record as written to train.jsonl: train/eval/analysis -> history; done -> summary."""
        kind, step = event_kind(rec), rec.get("step")
        if kind in HISTORY_EVENTS and _number(step):
            row = history_row(rec)
            self._call(step, lambda: self.run.log(row, step=int(step)))
        elif kind == "done":
            summary = {f"done/{k}": v for k, v in rec.items() if k not in ("type", "event", "time") and v is not None}
            self._call(step, lambda: self.run.summary.update(summary))

    def image(self, path: str | Path, step: int) -> None:
        """analysis.png as drawn at `step` (W&B copies the file)."""
        self._call(step, lambda: self.run.log({IMAGE_KEY: self.module.Image(str(path))}, step=int(step)))

    def close(self) -> None:
        if self.run is None:
            return
        run, self.run = self.run, None
        try:
            run.finish()
        except Exception as e:  # noqa: BLE001
            self.say(f"warning: --wandb: finishing the W&B run failed ({_why(e)})")

    def _call(self, step: Any, fn: Callable[[], Any]) -> None:
        if self.run is None:
            return
        try:
            fn()
        except Exception as e:  # noqa: BLE001 (no W&B problem may stop training)
            self.run = None  # not finished either: a broken service could hang the run's end
            self.say(f"warning: --wandb: logging to W&B failed at step {step} ({_why(e)}); "
                     f"training continues, nothing more goes to W&B")
