"""Two runs never share a run directory: a `dba train` holds an OS lock on it for its whole life
(dba/run_dir.py). A second `dba train` (new, --resume or --overwrite) on a directory in use stops
at once with one line naming the directory and the holder's pid, and changes nothing there; a
SIGKILLed holder leaves no stale lock; read-only commands work on a directory in use."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from dba.errors import UserError
from dba.run_dir import LOCK_NAME, RunDirLock
from tests.support import TINY, dba, dba_train, one_line_error, popen_train

pytestmark = pytest.mark.slow  # `dba train` processes competing for a run directory


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


class PausedRun:
    """A `dba train` paused (test-only DBA_FAULT hook) after step `at`, its files written."""

    def __init__(self, out: Path, data: Path, at: int, steps: int = 8):
        self.p = popen_train("--data", data, "--steps", steps, *TINY, "--out-dir", out, fault=f"pause_at_step:{at}")
        self.seen = []
        for line in self.p.stdout:
            self.seen.append(line)
            if line.startswith("DBA_FAULT: paused at step"):
                return
        raise AssertionError("the run ended before pausing:\n" + "".join(self.seen))

    def stop(self, sig=signal.SIGTERM) -> tuple[int, str]:
        self.p.send_signal(sig)
        rest, _ = self.p.communicate(timeout=300)
        return self.p.returncode, "".join(self.seen) + (rest or "")


def test_second_run_is_refused_and_changes_nothing_while_readers_work(data, tmp_path):
    out = tmp_path / "shared"
    first = PausedRun(out, data, 3)
    try:
        before = _snapshot(out)
        assert "train.jsonl" in before and "last.safetensors" in before
        for extra in ([], ["--resume"], ["--overwrite"]):
            r = dba_train("--data", data, "--steps", 8, *TINY, "--seed", 8, "--out-dir", out, *extra)
            one_line_error(r, 1)
            assert str(out) in r.stderr and f"pid {first.p.pid}" in r.stderr and "in use" in r.stderr, r.stderr
            assert _snapshot(out) == before, extra
        # read-only commands never take the lock
        report = dba("report", out, "--json", "--no-redraw", timeout=120)
        assert report.returncode == 0, report.stderr
        sample = dba("sample", "--ckpt", out, "--backend", "torch", "--prompt-tokens", "1,2,3", "--max-new-tokens", "4",
                     timeout=120)
        assert sample.returncode == 0, sample.stderr
        assert len(sample.stdout.strip().split(",")) == 7
        assert _snapshot(out) == before
    finally:
        code, text = first.stop()
    assert code == 143, text
    metas = [line for line in (out / "train.jsonl").read_text().splitlines() if '"type": "meta"' in line]
    assert len(metas) == 1 and '"seed": 7' in metas[0]


def test_sigkilled_holder_leaves_no_stale_lock(data, tmp_path):
    out = tmp_path / "killed"
    code, _ = PausedRun(out, data, 3, steps=4).stop(signal.SIGKILL)
    assert code == -signal.SIGKILL and (out / LOCK_NAME).exists()
    r = dba_train("--out-dir", out, "--resume", "--live", "off")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "complete at step 4" in r.stdout


def test_lock_object_refuses_a_second_holder_and_cleans_up_what_it_created(tmp_path):
    d = tmp_path / "new" / "run"
    a = RunDirLock(d).acquire()
    assert d.is_dir() and a.held and (d / LOCK_NAME).read_text().strip() == str(os.getpid())
    with pytest.raises(UserError) as e:  # flock locks are per open file: a second open is refused
        RunDirLock(d).acquire()
    assert f"pid {os.getpid()}" in str(e.value) and e.value.code == 1
    a.release(discard=True)
    assert not d.exists() and not d.parent.exists() and tmp_path.is_dir()
    b = RunDirLock(d).acquire()  # free again
    (d / "train.jsonl").write_text("")
    b.release(discard=True)
    assert (d / "train.jsonl").exists() and (d / LOCK_NAME).exists()  # not empty: kept


def test_generated_names_are_never_shared(tmp_path):
    a = RunDirLock(tmp_path / "runs" / "dba-decoupled-20261202-160342", new_name=True).acquire()
    b = RunDirLock(tmp_path / "runs" / "dba-decoupled-20261202-160342", new_name=True).acquire()
    assert a.dir.name == "dba-decoupled-20261202-160342" and b.dir.name == "dba-decoupled-20261202-160342-2"
    b.release(discard=True)
    assert not b.dir.exists() and a.dir.is_dir()
    a.release(discard=True)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("rank", [0, 1])
def test_multi_host_lock_only_the_writer_locks_and_all_stop_together(rank, tmp_path, monkeypatch):
    """cli/train.py's lock in a 2-process run (the processes simulated: process_count, is_main and
    the collective `agree` replaced): only process 0 takes the directory's lock; when it cannot,
    process 0 raises the lock's own error and process 1, told so through `agree`, stops with one
    line too; when it can, process 1 goes on without taking the lock; a generated run name is
    refused up front (the hosts could not agree on a timestamp)."""
    import train.distributed as dist
    from cli.train import _lock

    votes = []
    monkeypatch.setattr(dist, "process_count", lambda: 2)
    monkeypatch.setattr(dist, "is_main", lambda: rank == 0)

    def agree_with(other):  # the other process's vote: 1 = it could not lock
        def agree(value):
            votes.append(value)
            return max(value, other)
        return agree

    out = tmp_path / "run"
    holder = RunDirLock(out).acquire()  # another run holds the directory
    try:
        monkeypatch.setattr(dist, "agree", agree_with(1 if rank == 1 else 0))
        with pytest.raises(UserError) as e:
            _lock(out, new_name=False)
        if rank == 0:
            assert "in use" in str(e.value) and f"pid {os.getpid()}" in str(e.value) and votes == [1]
        else:
            assert str(e.value) == f"run directory {str(out)!r} is in use: process 0 could not lock it"
            assert votes == [0]  # process 1 never tried the lock itself
    finally:
        holder.release()
    monkeypatch.setattr(dist, "agree", agree_with(0))
    lock = _lock(out, new_name=False)  # free now
    try:
        assert (out / LOCK_NAME).exists()
        held = _held_by_someone(out)
        assert held == (rank == 0)  # only the writer holds it
    finally:
        lock.release()
    with pytest.raises(UserError, match="needs a fixed run directory"):
        _lock(tmp_path / "dba-gen", new_name=True)


def _held_by_someone(out: Path) -> bool:
    """Whether the directory's lock is held (by this process or another), without taking it."""
    import fcntl

    fd = os.open(out / LOCK_NAME, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
