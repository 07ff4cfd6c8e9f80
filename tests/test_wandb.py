"""`dba train --wandb` (train/wandb_log.py): what a run logs to Weights & Biases, read back from
the offline run's own file, and what happens when W&B is missing or fails.

The offline runs are read from `<run>/wandb/offline-run-*/run-<id>.wandb` itself: a LevelDB-style
log of W&B's protobuf `Record`s (`wandb.proto.wandb_internal_pb2`), checked block by block with
its CRCs (`wandb_records` below), so what is compared is what `wandb sync` would upload. W&B
starts its `wandb-core` service process on `wandb.init`, so those tests are `slow`; the failure
paths and the flags run in this process (the fast tier) with `wandb.init` replaced.
"""

from __future__ import annotations

import json
import platform
import struct
import sys
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import wandb  # the dev extra has it

from tests.support import TINY

# The fast tests train with PyTorch (no compile: ~1 s a run). Its environment record asks
# platform.processor(), which runs `uname -p` once per interpreter: here, at collection, where the
# fast tier's no-process guard does not apply, rather than inside the first test.
ARGS = [*map(str, TINY), "--backend", "torch", "--steps", "2", "--eval-every", "0", "--save-every", "0"]
platform.processor()


@pytest.fixture(autouse=True)
def _wandb_env(tmp_path, monkeypatch):
    """W&B's own files in this test's directory, never the network."""
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    monkeypatch.setenv("DBA_NO_MALLOC_TUNING", "1")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def _train(argv: list, capsys) -> tuple[int, str]:
    """`dba train ARGV` in this process: (exit status, stdout + stderr)."""
    from cli.main import main

    try:
        code = main(["train", *map(str, argv)])
    except SystemExit as e:  # argparse
        code = e.code
    cap = capsys.readouterr()
    return code, cap.out + cap.err


def _events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]


def _wandb_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "wandb" in line.lower() or "W&B" in line]


def _recorded_id(out: Path, backend: str) -> str | None:
    from cli.train import _resume_meta

    return _resume_meta(out, backend)["wandb_id"]


# ---- reading an offline run ---------------------------------------------------------------------
_BLOCK, _FULL, _FIRST, _MIDDLE, _LAST = 32768, 1, 2, 3, 4


def wandb_records(path: Path):
    """The protobuf Records of a .wandb file: a 7-byte header (':W&B', magic 0xBEE1, version 0),
    then 32 KiB blocks of chunks, each `<crc32 u32><length u16><type u8>` and its bytes; a record
    is one FULL chunk or FIRST, MIDDLE..., LAST. Every chunk's CRC (of its type byte and bytes)
    is checked."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0), data[:7]
    pos, parts = 7, []
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        body = data[pos + 7:pos + 7 + length]
        assert len(body) == length and zlib.crc32(body, zlib.crc32(bytes([kind]))) == crc, f"bad chunk at {pos}"
        pos += 7 + length
        parts.append(body)
        assert (kind == _FIRST) == (len(parts) == 1) or kind == _FULL, (pos, kind)
        if kind in (_FULL, _LAST):
            rec = pb.Record()
            rec.ParseFromString(b"".join(parts))
            parts = []
            yield rec
        else:
            assert kind in (_FIRST, _MIDDLE), (pos, kind)
    assert not parts and pos == len(data), "a torn record at the end"


def _items(update) -> dict:
    """{key: value} of a record's items; an item W&B flattened (`nested_key`, e.g. an image's
    fields) is nested again."""
    out: dict = {}
    for item in update:
        *parents, last = list(item.nested_key) or [item.key]
        node = out
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = json.loads(item.value_json)
    return out


def read_offline_run(run_dir: Path) -> dict:
    """{id, project, name, group, tags, config, history: {step: row}, summary} of one offline run
    directory; rows logged at one step are merged, as W&B shows them.

    `run.finish()` returns before W&B's service has written the whole file; `wandb.teardown()`
    waits for the service to stop (it starts again at the next `wandb.init`)."""
    wandb.teardown()
    (path,) = run_dir.glob("run-*.wandb")
    out = {"history": {}, "summary": {}, "config": {}}
    for rec in wandb_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            out.update(id=r.run_id, project=r.project, name=r.display_name, group=r.run_group, tags=list(r.tags))
            out["config"].update(_items(r.config.update))
        elif kind == "config":
            out["config"].update(_items(rec.config.update))
        elif kind == "history":
            row = _items(rec.history.item)
            out["history"].setdefault(row["_step"], {}).update(row)
        elif kind == "summary":
            out["summary"].update(_items(rec.summary.update))
    return out


def test_reader_checks_what_it_reads(tmp_path):
    """The reader is not a pass-through: a flipped byte (CRC) and a cut file are refused."""
    from wandb.proto import wandb_internal_pb2 as pb

    rec = pb.Record()
    rec.history.item.add(key="train/loss", value_json="1.5")
    body = rec.SerializeToString()
    chunk = struct.pack("<IHB", zlib.crc32(body, zlib.crc32(bytes([_FULL]))), len(body), _FULL) + body
    good = tmp_path / "good.wandb"
    good.write_bytes(struct.pack("<4sHB", b":W&B", 0xBEE1, 0) + chunk * 2)
    assert [_items(r.history.item) for r in wandb_records(good)] == [{"train/loss": 1.5}] * 2
    bad = tmp_path / "bad.wandb"
    bad.write_bytes(good.read_bytes()[:-1] + b"\x00")
    with pytest.raises(AssertionError, match="bad chunk"):
        list(wandb_records(bad))
    bad.write_bytes(good.read_bytes()[:-3])
    with pytest.raises(AssertionError):
        list(wandb_records(bad))


# ---- end to end, offline (slow: wandb.init starts W&B's service process) --------------------------
def _check_history(logged: dict, events: list[dict]) -> None:
    """Every number of every train/eval/analysis event is in the history row of its step, under
    `<event>/<field>`, with the same value, and the rows hold nothing else of ours."""
    from train.wandb_log import HISTORY_EVENTS, history_row

    want: dict[int, dict] = {}
    for e in events:
        if e["type"] in HISTORY_EVENTS:
            row = history_row(e)
            assert f"{e['type']}/loss" in row or e["type"] != "train"
            want.setdefault(e["step"], {}).update(row)
    ours = {step: {k: v for k, v in row.items() if not k.startswith("_") and k != "analysis_png"}
            for step, row in logged["history"].items()}
    assert ours == want
    n_numbers = sum(1 for e in events if e["type"] == "train" for v in e.values() if isinstance(v, float))
    assert n_numbers > 10 * sum(1 for e in events if e["type"] == "train")  # the comparison covered the fields


@pytest.mark.slow
def test_offline_run_logs_the_run_and_resume_continues_it(data, tmp_path, capsys):
    """A JAX run with evaluations and the full analysis: config, history, image and summary in the
    offline W&B run; `--resume` (no W&B flag typed) logs to the same W&B run from the next step."""
    out = tmp_path / "run"
    flags = ["--data", data, *map(str, TINY), "--backend", "jax", "--instrument", "full", "--eval-every", "3",
             "--save-every", "3", "--out-dir", out]
    code, text = _train([*flags, "--steps", "6", "--wandb", "--wandb-mode", "offline", "--wandb-project", "dba-test",
                         "--wandb-tags", "toy, w&b", "--wandb-group", "g1"], capsys)
    assert code == 0, text
    (line,) = _wandb_lines(text)
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    assert line.startswith("W&B: run ") and f"wandb sync {run_dir}" in line, line
    logged = read_offline_run(run_dir)
    events = _events(out)
    meta, done = events[0], events[-1]
    assert (logged["project"], logged["name"], logged["group"], logged["tags"]) == ("dba-test", "run", "g1",
                                                                                    ["toy", "w&b"])
    for key in ("args", "config", "env", "data", "n_params", "context", "backend"):
        assert logged["config"][key] == meta[key], key
    assert logged["config"]["args"]["wandb_tags"] == "toy, w&b" and "flags" not in logged["config"]
    _check_history(logged, events)
    assert sorted(logged["history"]) == list(range(7))
    # analysis.png at each evaluation (0, 3, 6); the last one is the file the run left
    images = {s: row["analysis_png"] for s, row in logged["history"].items() if "analysis_png" in row}
    assert sorted(images) == [0, 3, 6] and images[6]["_type"] == "image-file"
    assert (run_dir / "files" / images[6]["path"]).read_bytes() == (out / "analysis.png").read_bytes()
    assert {k: v for k, v in logged["summary"].items() if k.startswith("done/")} == {
        f"done/{k}": v for k, v in done.items() if k not in ("type", "time") and v is not None}
    assert logged["summary"]["done/reason"] == "complete" and logged["summary"]["done/step"] == 6
    assert _recorded_id(out, "jax") == logged["id"]

    code, text = _train([*flags, "--steps", "9", "--resume"], capsys)
    assert code == 0, text
    (line,) = _wandb_lines(text)
    assert line.startswith(f"W&B: run {logged['id']} (continued)"), line
    (second,) = set((out / "wandb").glob("offline-run-*")) - {run_dir}
    resumed = read_offline_run(second)
    assert resumed["id"] == logged["id"] and resumed["project"] == "dba-test"
    assert resumed["config"]["resumed_from"] == 6
    assert sorted(resumed["history"]) == [7, 8, 9]  # after the resumed step: the curve goes on
    events = _events(out)
    _check_history(resumed, events[[e["type"] for e in events].index("meta", 1):])
    assert resumed["summary"]["done/step"] == 9


@pytest.mark.slow
def test_torch_backend_logs_the_same_records(data, tmp_path, capsys):
    """The sink lives in the framework-free loop: the PyTorch trainer's run logs its records too,
    and --wandb-id names the W&B run (recorded for --resume)."""
    out = tmp_path / "t"
    code, text = _train(["--data", data, *map(str, TINY), "--backend", "torch", "--steps", "4", "--eval-every", "0",
                         "--out-dir", out, "--wandb", "--wandb-id", "dba-torch-1"], capsys)  # mode: $WANDB_MODE
    assert code == 0, text
    (run_dir,) = (out / "wandb").glob("offline-run-*-dba-torch-1")
    logged = read_offline_run(run_dir)
    assert logged["id"] == "dba-torch-1" and logged["project"] == "experiments" and logged["name"] == "t"
    _check_history(logged, _events(out))
    assert logged["config"]["backend"] == "torch" and logged["summary"]["done/reason"] == "complete"
    assert _recorded_id(out, "torch") == "dba-torch-1"


# ---- failures and switches (fast: in this process, no W&B service) --------------------------------
def _completed(out: Path) -> None:
    events = _events(out)
    assert events[-1]["type"] == "done" and events[-1]["reason"] == "complete" and events[-1]["step"] == 2
    assert sum(e["type"] == "train" for e in events) == 2


def _replace_init(monkeypatch, init) -> list:
    """wandb.init replaced (and wandb.setup, which would start W&B's service process: the
    settings it is given are returned)."""
    setups: list = []
    monkeypatch.setattr(wandb, "setup", lambda settings=None: setups.append(settings))
    monkeypatch.setattr(wandb, "init", init)
    return setups


def test_missing_package_is_one_warning_line(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    out = tmp_path / "r"
    code, text = _train(["--data", data, *ARGS, "--out-dir", out, "--wandb"], capsys)
    assert code == 0, text
    assert _wandb_lines(text) == ["warning: --wandb: the wandb package is not installed (pip install 'dba[wandb]'); "
                                  "training continues without W&B"]
    _completed(out)
    assert not (out / "wandb").exists() and _recorded_id(out, "torch") is None


def test_init_failure_is_one_warning_line(data, tmp_path, capsys, monkeypatch):
    """W&B refusing to start (no login, no network, a bad entity) is one line; the flags reach
    wandb.init as v29 passed them."""
    calls = []

    def init(**kw):
        calls.append(kw)
        raise wandb.errors.CommError("could not reach api.wandb.ai\nretrying...")

    setups = _replace_init(monkeypatch, init)
    out = tmp_path / "r"
    code, text = _train(["--data", data, *ARGS, "--out-dir", out, "--wandb", "--wandb-mode", "online",
                         "--wandb-entity", "team", "--wandb-name", "n1", "--wandb-group", "g", "--wandb-tags", "a,,b ",
                         "--wandb-id", "abc-1"], capsys)
    assert code == 0, text
    assert _wandb_lines(text) == ["warning: --wandb: W&B did not start (CommError: could not reach api.wandb.ai); "
                                  "training continues without W&B"]
    (kw,) = calls
    assert {k: kw[k] for k in ("project", "entity", "name", "group", "tags", "mode", "id", "resume", "dir")} == {
        "project": "experiments", "entity": "team", "name": "n1", "group": "g", "tags": ["a", "b"], "mode": "online",
        "id": "abc-1", "resume": "allow", "dir": str(out)}
    assert kw["config"]["args"]["wandb_id"] == "abc-1" and kw["config"]["backend"] == "torch"
    # W&B's own output off (its login line comes before init's settings apply), console not wrapped
    assert [x.silent for x in setups] == [True] and (kw["settings"].silent, kw["settings"].console) == (True, "off")
    _completed(out)


class _FakeRun:
    """A W&B run whose `log` fails from its `fail_at`-th call on (a service that went away)."""

    def __init__(self, fail_at: int):
        self.fail_at, self.logged, self.summary, self.finished = fail_at, [], {}, False
        self.id, self.url, self.settings = "fake01", "https://wandb.example/fake01", SimpleNamespace(mode="online")

    def log(self, row, step):
        if len(self.logged) + 1 >= self.fail_at:
            raise BrokenPipeError("the W&B service went away")
        self.logged.append((step, dict(row)))

    def finish(self):
        self.finished = True


def test_log_failure_mid_run_warns_once_and_stops_logging(data, tmp_path, capsys, monkeypatch):
    run = _FakeRun(fail_at=2)
    _replace_init(monkeypatch, lambda **kw: run)
    out = tmp_path / "r"
    code, text = _train(["--data", data, *ARGS, "--out-dir", out, "--wandb"], capsys)
    assert code == 0, text
    assert _wandb_lines(text) == [
        "W&B: run fake01, https://wandb.example/fake01",
        "warning: --wandb: logging to W&B failed at step 2 (BrokenPipeError: the W&B service went away); "
        "training continues, nothing more goes to W&B"]
    first = _events(out)[1]
    assert run.logged == [(1, {f"train/{k}": v for k, v in first.items() if k not in ("type", "step", "time")
                               and isinstance(v, (int, float))})]
    assert run.summary == {} and not run.finished  # nothing more after the failure
    _completed(out)
    assert _recorded_id(out, "torch") == "fake01"  # the W&B run exists: a resume continues it


def test_log_goes_to_wandb_until_done(data, tmp_path, capsys, monkeypatch):
    """Without a failure: every train record, the end's analysis.png, the `done` summary, finish."""
    run = _FakeRun(fail_at=10**9)
    _replace_init(monkeypatch, lambda **kw: run)
    out = tmp_path / "r"
    code, text = _train(["--data", data, *ARGS, "--out-dir", out, "--wandb", "--live-plot", "--log-every", "2"],
                        capsys)
    assert code == 0, text
    assert [s for s, row in run.logged if "train/loss" in row] == [2]
    (image,) = [(s, row["analysis_png"]) for s, row in run.logged if "analysis_png" in row]  # not the live plots
    assert image[0] == 2 and isinstance(image[1], wandb.Image)
    assert run.summary["done/reason"] == "complete" and run.summary["done/step"] == 2 and run.finished


@pytest.mark.parametrize("argv,needle", [
    (["--wandb-mode", "cloud"], "argument --wandb-mode: invalid choice: 'cloud'"),
    (["--wandb-project", "team/proj"], "--wandb-project 'team/proj': W&B refuses / in it"),
    (["--wandb-project", "p" * 129], "more than 128 characters"),
    (["--wandb-id", "run:1"], "--wandb-id 'run:1': W&B refuses : in it"),
    (["--wandb-id", " "], "--wandb-id ' ': empty or padded with spaces"),
    (["--wandb-tags", "ok," + "t" * 65], "--wandb-tags: tag 'ttttt"),
])
def test_flag_mistakes_are_one_line(argv, needle, data, tmp_path, capsys):
    out = tmp_path / "x"
    code, text = _train(["--data", data, "--out-dir", out, "--wandb", *argv], capsys)
    lines = text.strip().splitlines()
    assert code == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in text, text
    assert not out.exists()


def test_flags_are_recorded(capsys):
    from cli.main import main

    assert main(["train", "--print-config", "--wandb", "--wandb-tags", "a,b"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["run_dir"] == "runs/default"  # W&B changes what is observed, not what is trained
    args = out["args"]
    assert (args["wandb"], args["wandb_tags"], args["wandb_project"], args["wandb_mode"]) == (True, "a,b",
                                                                                              "experiments", None)


def test_resume_logs_to_the_recorded_wandb_run_and_disabled_logs_nothing(data, tmp_path, capsys, monkeypatch):
    """--resume inherits --wandb and logs to the W&B run the checkpoint recorded, from the next
    step; a typed --wandb-id picks another; --wandb-mode disabled logs nothing (W&B is not
    started) and keeps the recorded id."""
    inits, runs = [], []

    def init(**kw):
        inits.append(kw)
        runs.append(_FakeRun(fail_at=10**9))
        runs[-1].id = kw["id"] or "fake01"
        return runs[-1]

    _replace_init(monkeypatch, init)
    out = tmp_path / "r"
    base = ["--data", data, *ARGS, "--out-dir", out]
    assert _train([*base, "--wandb", "--wandb-project", "p1"], capsys)[0] == 0
    code, text = _train([*base, "--resume", "--steps", "3"], capsys)
    assert code == 0, text
    assert {k: inits[1][k] for k in ("id", "resume", "project")} == {"id": "fake01", "resume": "allow", "project": "p1"}
    assert "W&B: run fake01 (continued)" in text and {step for step, _ in runs[1].logged} == {3}
    code, text = _train([*base, "--resume", "--steps", "4", "--wandb-id", "other"], capsys)
    assert code == 0 and inits[2]["id"] == "other" and _recorded_id(out, "torch") == "other", text
    code, text = _train([*base, "--resume", "--steps", "5", "--wandb-mode", "disabled"], capsys)
    assert code == 0 and _wandb_lines(text) == [] and len(inits) == 3, text  # wandb.init not called
    assert _recorded_id(out, "torch") == "other" and _events(out)[-1]["step"] == 5  # kept for a later --resume


def test_history_row_maps_per_layer_lists_and_skips_what_is_not_a_number():
    from train.wandb_log import history_row

    rec = {"type": "analysis", "step": 5, "time": 1.0, "seq_len": 16, "level": "full", "layers": [0, 3],
           "heads": [0], "attn_entropy_mean": 1.5, "attn_entropy_by_layer": [1.25, 1.75], "note": None, "ok": True}
    assert history_row(rec) == {"analysis/seq_len": 16, "analysis/attn_entropy_mean": 1.5,
                                "analysis/attn_entropy_by_layer/0": 1.25, "analysis/attn_entropy_by_layer/3": 1.75}


def test_wandb_flags_do_not_make_a_report_variant(tmp_path):
    """`dba report` groups runs that differ only by seed and presentation flags: the W&B flags
    are presentation (every one of them, by the flag table)."""
    from dba.config import ModelConfig
    from dba.report import summarize
    from train.args import FLAG_BY_NAME, run_config

    def row(seed, **typed):
        flags = run_config({"seed": seed, **typed}).to_flags()
        meta = {"config": ModelConfig(vocab_size=97).to_dict(), "flags": flags}
        return summarize({"dir": tmp_path, "meta": meta, "events": []})["variant_key"]

    typed = {name: "x" for name, f in FLAG_BY_NAME.items() if f.group == "wandb" and f.kind == "str" and not f.choices}
    assert row(1) == row(2, wandb=True, wandb_mode="offline", **typed)
    assert row(1) != row(1, lr=1e-3)
