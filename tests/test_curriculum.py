"""Sequence curriculum: parsing, the length at a step, lengths used, max length."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dba.errors import UserError
from train.curriculum import ScheduleError, parse_schedule


def test_seed_schedule():
    s = parse_schedule("256@0,512@500,1024@2000", 512)
    assert s.entries == ((0, 256), (500, 512), (2000, 1024))
    assert [s.length_at(i) for i in (0, 499, 500, 1999, 2000, 10**6)] == [256, 256, 512, 512, 1024, 1024]
    assert s.max_length(6000) == 1024
    assert s.max_length(2000) == 512  # step 2000 is never taken by a 2000-step run
    assert s.max_length(2001) == 1024
    assert s.lengths_until(600) == [256, 512]
    assert s.boundaries(6000) == [(0, 256), (500, 512), (2000, 1024)]
    assert s.to_string() == "256@0,512@500,1024@2000"


@pytest.mark.parametrize("text,entries", [
    (None, ()), ("", ()), ("  ", ()), ("64", ((0, 64),)), (" 64 @ 0 , 128@ 10 ", ((0, 64), (10, 128))),
    ("32@5", ((5, 32),)), ("128@0,64@10", ((0, 128), (10, 64))),
])
def test_valid_forms(text, entries):
    s = parse_schedule(text, 100)
    assert s.entries == entries


def test_default_before_first_entry_and_constant():
    s = parse_schedule("32@5", 16)
    assert [s.length_at(i) for i in range(7)] == [16] * 5 + [32, 32]
    assert s.lengths_until(5) == [16] and s.lengths_until(6) == [16, 32]
    assert s.max_length(3) == 16 and s.max_length(100) == 32
    c = parse_schedule(None, 77)
    assert c.length_at(0) == c.length_at(10**9) == 77 and c.max_length(10) == 77 and c.lengths_until(10) == [77]


@pytest.mark.parametrize("bad", ["256@0,512", "abc", "256@x", "0@0", "256@0,512@0", "256@10,512@5", "256@0,,512@5",
                                 "-5@0", "256@-1", "1.5@0", "256@0;512@5"])
def test_malformed_raises_one_line_naming_it(bad):
    with pytest.raises(ScheduleError) as e:
        parse_schedule(bad, 128)
    msg = str(e.value)
    assert isinstance(e.value, UserError) and "\n" not in msg
    assert repr(bad) in msg and "seq-schedule" in msg


def test_bad_default_len():
    with pytest.raises(UserError):
        parse_schedule(None, 0)


@st.composite
def schedules(draw):
    n = draw(st.integers(1, 6))
    starts = sorted(draw(st.sets(st.integers(0, 5000), min_size=n, max_size=n)))
    lengths = draw(st.lists(st.integers(1, 4096), min_size=n, max_size=n))
    return list(zip(starts, lengths))


@settings(max_examples=150, deadline=None)
@given(schedules(), st.integers(1, 6000), st.integers(1, 512))
def test_property_roundtrip_and_lengths(entries, total, default_len):
    text = ",".join(f"{L}@{s}" for s, L in entries)
    s = parse_schedule(text, default_len)
    assert s.entries == tuple(entries)
    assert parse_schedule(s.to_string(), default_len) == s
    # brute force: the length at every step, and what a run of `total` steps uses
    def brute(i):
        last = default_len
        for start, length in entries:
            if start <= i:
                last = length
        return last

    probe = sorted({0, total - 1} | {e[0] for e in entries} | {max(e[0] - 1, 0) for e in entries})
    for i in probe:
        assert s.length_at(i) == brute(i)
    used = {brute(i) for i in probe if i < total}
    assert set(s.lengths_until(total)) == used
    assert s.max_length(total) == max(used)
    assert len(s.lengths_until(total)) == len(set(s.lengths_until(total)))
    b = s.boundaries(total)
    assert b[0][0] == 0 and all(b[k][1] != b[k + 1][1] for k in range(len(b) - 1))
    assert all(s.length_at(step) == length for step, length in b)
