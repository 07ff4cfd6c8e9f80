"""Property-based tests (hypothesis) for what users hand us and what the KV cache stores.

1. Token files (`dba.data.load_tokens`: .npy, raw .bin with a data dtype, text through the byte
   tokenizer; `check_enough`, `split_train_val`, `sample_batch`): for any file content the reader
   either returns exactly what was written or raises a one-line `UserError` naming the bad value
   (the id and its index, the dtype, the size), never another exception.
2. `--seq-schedule` (`train.curriculum.parse_schedule`): any text gives a schedule whose
   properties hold, or a one-line `ScheduleError`.
3. `--mesh` (`train.sharding.parse_mesh`, `resolve_mesh`, `check_batch`): any text gives valid
   axes, or a one-line `UserError`.
4. KV quantizers (q8_0 / q4_0 / nf4, `jax_model.kvcache` and `torch_ref.kvcache`): any finite
   input quantizes without NaN/Inf, within the format's error bound, to the same bytes in both
   frameworks; non-finite input is refused by the eager entry points with a one-line ValueError.

tests/test_data.py, tests/test_curriculum.py and parity_tests/test_quant_parity.py hold the
example-based tests and the round trips of well-formed input; the properties here are about
arbitrary (mostly malformed) input. Examples are drawn deterministically (derandomize, no example
database), so CI sees the same ones every run.
"""

from __future__ import annotations

import io
import itertools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dba.data import TOKEN_DTYPES, check_enough, load_tokens, sample_batch, split_train_val
from dba.errors import UserError
from dba.kvspec import NF4_LEVELS, quant_layout
from jax_model import kvcache as jkv
from tests.support import ref_quantize
from torch_ref import kvcache as tkv
from train.curriculum import ScheduleError, parse_schedule
from train.sharding import MESH_AXES, check_batch, mesh_text, parse_mesh, resolve_mesh

_PROFILE = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])


def props(n: int):
    return settings(max_examples=n, **_PROFILE)


def outcome(fn):
    """(result, None) or (None, message) for a UserError, whose message must be one line.
    Any other exception propagates and fails the test."""
    try:
        res = fn()
    except UserError as e:
        msg = str(e)
        assert msg and len(msg.splitlines()) == 1 and "\n" not in msg, repr(msg)
        event("UserError: " + re.sub(r"'[^']*'|\S*\d\S*|\S*/\S*", "_", msg)[:60])  # statistics only
        return None, msg
    event("accepted")
    return res, None


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("props")


_names = itertools.count()


def new_path(workdir, suffix: str) -> str:
    # A fresh name per example: a memmap of the previous example's file may still be alive, and
    # truncating a mapped file would SIGBUS whoever reads it.
    return str(workdir / f"f{next(_names)}{suffix}")


def write(path: str, content: bytes) -> str:
    with open(path, "wb") as f:
        f.write(content)
    return path


# ================================================================ 1. token files


def id_verdict(ids: list[int], vocab: int | None):
    """What load_tokens must do with this stream of ids: ("ok", vocab) or ("bad", [phrases the
    message must hold]). Negative ids are reported first (the most negative, first index), then
    the largest id (first index) when it is >= vocab_size."""
    if not ids:
        return "bad", ["no tokens"]
    low = min(ids)
    if low < 0:
        return "bad", [f"negative token id {low} at index {ids.index(low)}"]
    top = max(ids)
    if vocab is None:
        return "ok", top + 1
    if top >= vocab:
        return "bad", [f"token id {top} at index {ids.index(top)}", f"vocab_size {vocab}"]
    return "ok", vocab


def check_load(path: str, ids: list[int], vocab, dtype_name: str | None, **kw):
    """load_tokens(path) against the verdict for `ids` (the stream the file holds)."""
    res, err = outcome(lambda: load_tokens(path, vocab_size=vocab, **kw))
    if vocab is not None and vocab <= 0:
        assert err is not None and "vocab_size must be positive" in err
        return
    verdict, want = id_verdict(ids, vocab)
    if verdict == "bad":
        assert err is not None, f"accepted {ids[:8]}... with vocab {vocab}"
        assert path in err and all(w in err for w in want), (err, want)
        return
    assert err is None, err
    tokens, vs, tok = res
    assert tokens.ndim == 1 and tokens.tolist() == ids
    if dtype_name is not None:
        assert tokens.dtype.name == dtype_name
    assert vs == want
    del tokens, res  # drop the memmap before the next example


# Big enough to reach every id range, small enough to stay fast.
_VOCABS = st.one_of(st.none(), st.integers(-2, 0), st.integers(1, 300), st.integers(1, 2**40))
_BIN_DTYPES = TOKEN_DTYPES + ("float16", "float32", "uint8", "int16", "uint64", "bogus")


@st.composite
def bin_contents(draw):
    dtype = draw(st.sampled_from(_BIN_DTYPES))
    if draw(st.booleans()) or dtype not in TOKEN_DTYPES:
        return dtype, draw(st.binary(max_size=40))  # garbage: any length, any bytes
    info = np.iinfo(dtype)
    hi = draw(st.sampled_from([300, int(info.max)]))
    ids = draw(st.lists(st.integers(max(int(info.min), -5), hi), max_size=12))
    tail = draw(st.sampled_from([b"", b"", b"\x07", b"\x01\x02\x03"]))  # a torn last id
    return dtype, np.asarray(ids, dtype=dtype).tobytes() + tail


@props(200)
@given(case=bin_contents(), vocab=_VOCABS)
def test_bin_reader_returns_what_was_written_or_one_line_error(workdir, case, vocab):
    data_dtype, content = case
    path = write(new_path(workdir, ".bin"), content)
    if not content:
        _, err = outcome(lambda: load_tokens(path, data_dtype=data_dtype, vocab_size=vocab))
        assert err is not None and ("empty" in err or "vocab_size" in err)
        return
    if vocab is not None and vocab <= 0:
        return check_load(path, [], vocab, None, data_dtype=data_dtype)
    if data_dtype not in TOKEN_DTYPES:
        _, err = outcome(lambda: load_tokens(path, data_dtype=data_dtype, vocab_size=vocab))
        assert err is not None and repr(data_dtype) in err and "not supported" in err
        return
    itemsize = np.dtype(data_dtype).itemsize
    if len(content) % itemsize:
        _, err = outcome(lambda: load_tokens(path, data_dtype=data_dtype, vocab_size=vocab))
        assert err is not None
        assert all(w in err for w in (path, f"size {len(content)} bytes", f"multiple of {itemsize}", data_dtype))
        return
    ids = np.frombuffer(content, dtype=np.dtype(data_dtype).newbyteorder("=")).tolist()
    check_load(path, ids, vocab, data_dtype, data_dtype=data_dtype)


_NPY_DTYPES = ("uint16", "uint32", "int32", "int64", ">u2", ">i8", "int8", "uint8", "int16",
               "uint64", "float16", "float32", "float64", "bool", "complex64")


@st.composite
def npy_arrays(draw):
    dtype = np.dtype(draw(st.sampled_from(_NPY_DTYPES)))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
    if dtype.kind in "iu" and draw(st.booleans()):  # small ids, so vocab checks can pass too
        lo = 0 if dtype.kind == "u" else -3
        arr = draw(hnp.arrays(dtype, shape, elements=st.integers(lo, min(400, int(np.iinfo(dtype).max)))))
    else:
        arr = draw(hnp.arrays(dtype, shape))
    return np.asfortranarray(arr) if draw(st.booleans()) else arr


@props(200)
@given(arr=npy_arrays(), vocab=_VOCABS, suffix=st.sampled_from([".npy", ".dat", ""]))
def test_npy_reader_returns_the_row_major_stream_or_one_line_error(workdir, arr, vocab, suffix):
    buf = io.BytesIO()
    np.save(buf, arr)
    path = write(new_path(workdir, suffix), buf.getvalue())  # no .npy suffix: found by its magic
    if vocab is not None and vocab <= 0:
        return check_load(path, [], vocab, None)
    if arr.dtype.name not in TOKEN_DTYPES:
        _, err = outcome(lambda: load_tokens(path, vocab_size=vocab))
        assert err is not None and path in err and f"token dtype {arr.dtype.name}" in err, err
        return
    # 2-D (n_docs, T) blocks are read as their row-major flattening, whatever the file's order.
    check_load(path, arr.reshape(-1, order="C").tolist(), vocab, arr.dtype.name)


@st.composite
def damaged_npy(draw):
    """A valid .npy of token ids, then damaged: its header text edited, truncated, bytes
    overwritten, bytes inserted, or everything after the magic replaced."""
    dtype = draw(st.sampled_from(TOKEN_DTYPES))
    arr = np.asarray(draw(st.lists(st.integers(0, 300), min_size=1, max_size=10)), dtype=dtype)
    buf = io.BytesIO()
    np.save(buf, arr)
    b = bytearray(buf.getvalue())
    how = draw(st.sampled_from(["header", "header", "truncate", "overwrite", "insert", "garbage"]))
    if how == "header":  # edit the header's Python-literal dict text: brackets, quotes, prefixes
        end = b.index(b"}") + 1
        for _ in range(draw(st.integers(1, 3))):
            at = draw(st.integers(10, end - 1))
            new = draw(st.sampled_from([b"", b"{", b"}", b"(", b")", b"[", b"'", b'"', b"b", b"u", b",",
                                        b":", b" ", b"\n", b"9", b"-", b"#", b"\\", b"'''"]))
            b[at:at + draw(st.integers(0, 2))] = new
    elif how == "truncate":
        b = b[: draw(st.integers(0, len(b) - 1))]
    elif how == "overwrite":
        for _ in range(draw(st.integers(1, 4))):
            b[draw(st.integers(0, len(b) - 1))] = draw(st.integers(0, 255))
    elif how == "insert":
        at = draw(st.integers(0, len(b)))
        b[at:at] = draw(st.binary(min_size=1, max_size=6))
    else:
        b = b[:8] + draw(st.binary(max_size=120))
    return bytes(b)


@props(300)
@given(content=damaged_npy(), suffix=st.sampled_from([".npy", ""]))
def test_damaged_npy_loads_consistently_or_one_line_error(workdir, content, suffix):
    path = write(new_path(workdir, suffix), content)
    res, err = outcome(lambda: load_tokens(path))
    if err is not None:
        assert path in err
        return
    tokens, vocab, _ = res
    # Damage the reader cannot see (a digit of the data, spaces in the header) loads: then it
    # must be what numpy reads without memory-mapping, and a consistent token stream.
    assert tokens.ndim == 1 and tokens.dtype.name in TOKEN_DTYPES and tokens.size > 0
    ids = tokens.tolist()
    assert ids == np.load(path, allow_pickle=False).reshape(-1).tolist()
    assert min(ids) >= 0 and vocab == max(ids) + 1
    del tokens, res


@props(100)
@given(content=st.binary(max_size=64), vocab=st.one_of(st.none(), st.integers(1, 300)),
       suffix=st.sampled_from([".txt", ".text", ".md"]))
def test_text_file_byte_tokenizer_ids_are_the_bytes(workdir, content, vocab, suffix):
    path = write(new_path(workdir, suffix), content)
    # utf8: text to tokenize (auto would read a .txt of only digits and spaces as token ids)
    res, err = outcome(lambda: load_tokens(path, data_format="utf8", tokenizer="byte", vocab_size=vocab))
    if not content:
        assert err is not None and "empty" in err and path in err
        return
    ids = list(content)  # any bytes, UTF-8 or not: the byte tokenizer's ids are the file's bytes
    verdict, want = id_verdict(ids, 256 if vocab is None else vocab)
    if verdict == "bad":
        assert err is not None and path in err and all(w in err for w in want), (err, want)
        return
    assert err is None, err
    tokens, vs, tok = res
    assert tokens.tolist() == ids and vs == want and tok.name == "byte"


_FRACS = st.one_of(st.floats(0, 1), st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from([0.0, 1.0, 0.5, 1e-300, 1 - 1e-16, -0.0]))


@props(200)
@given(n=st.integers(0, 80), val_frac=_FRACS)
def test_split_train_val_is_a_tail_split_or_one_line_error(n, val_frac):
    tokens = np.arange(n, dtype=np.int64)
    res, err = outcome(lambda: split_train_val(tokens, val_frac))
    if not 0.0 < val_frac < 1.0:
        assert err is not None and "val_frac" in err
        return
    cut = int(n * (1.0 - val_frac))
    if cut < 2 or n - cut < 2:
        assert err is not None and f"{n} tokens" in err and "at least 2" in err, err
        return
    assert err is None, err
    train, val = res
    assert len(train) == cut and train.tolist() + val.tolist() == list(range(n))
    assert np.shares_memory(train, tokens) and np.shares_memory(val, tokens)


@st.composite
def token_streams(draw):
    dtype = draw(st.sampled_from(("uint16", "int32", "uint32", "int64")))
    top = int(np.iinfo(dtype).max)
    ids = st.integers(0, min(top, 2**31 - 1))
    if top > 2**31 - 1 and draw(st.booleans()):  # ids around the int32 limit, and past it
        ids = st.one_of(ids, st.integers(2**31 - 2, top))
    ids = draw(st.lists(ids, min_size=draw(st.sampled_from([0, 8, 24])), max_size=48))
    return np.asarray(ids, dtype=dtype)


@props(200)
@given(tokens=token_streams(), batch=st.integers(-1, 5),
       seq_len=st.one_of(st.integers(1, 6), st.integers(-2, 42)),
       seed=st.integers(-2, 2**40), step=st.integers(0, 10**6), stream=st.integers(0, 3),
       rows=st.one_of(st.none(), st.tuples(st.integers(0, 5), st.integers(0, 5))))
def test_sample_batch_windows_are_exact_or_one_line_error(tokens, batch, seq_len, seed, step, stream, rows):
    n = len(tokens)
    sl = None if rows is None else slice(*rows)
    _, err = outcome(lambda: check_enough(tokens, seq_len, "the data"))
    res, err2 = outcome(lambda: sample_batch(tokens, batch, seq_len, seed, step, stream, rows=sl))
    if seq_len < 1:
        assert err is not None and err2 is not None and f"got {seq_len}" in err
        return
    if n < seq_len + 1:
        assert err is not None and err2 is not None
        assert f"the data has {n} tokens" in err and f"seq_len + 1 = {seq_len + 1}" in err
        return
    assert err is None, err
    if batch < 1 or seed < 0:
        assert err2 is not None and ("batch size" in err2 if batch < 1 else "seed" in err2), err2
        return
    ids = tokens.tolist()
    if err2 is not None:  # only for ids the int32 batch cannot hold, naming one and where it is
        assert "does not fit the int32" in err2
        bad = int(err2.split("token id ")[1].split()[0])
        at = int(err2.split(" at index ")[1].split()[0])
        assert bad > 2**31 - 1 and ids[at] == bad
        event("id past int32 refused")
        return
    x, y = res
    n_rows = len(range(batch)[sl]) if sl is not None else batch
    assert x.shape == y.shape == (n_rows, seq_len) and x.dtype == y.dtype == np.int32
    for xr, yr in zip(x.tolist(), y.tolist()):  # each row is a real window, values unchanged
        assert any(ids[o:o + seq_len] == xr and ids[o + 1:o + seq_len + 1] == yr
                   for o in range(n - seq_len))
    full, err3 = outcome(lambda: sample_batch(tokens, batch, seq_len, seed, step, stream))  # same draw, all rows
    if err3 is None:
        assert (full[0][sl if sl is not None else slice(None)] == x).all()
    else:  # a host reading only its rows checks only those
        assert sl is not None and "does not fit the int32" in err3


# ================================================================ 2. --seq-schedule


_SCHED_PIECES = st.sampled_from(list("0123456789@,- \t.+x_\n") + ["٤", "9" * 4400, "256@0", "512@10", "@", ",,"])
_TEXTS_SCHED = st.one_of(st.lists(_SCHED_PIECES, max_size=12).map("".join), st.text(max_size=24), st.none())


@props(300)
@given(text=_TEXTS_SCHED, default_len=st.integers(-2, 600), total=st.integers(0, 3000))
def test_seq_schedule_any_text_is_valid_or_one_line_error(text, default_len, total):
    res, err = outcome(lambda: parse_schedule(text, default_len))
    if default_len <= 0:
        assert err is not None
        return
    if err is not None:
        with pytest.raises(ScheduleError):
            parse_schedule(text, default_len)
        assert "seq-schedule" in err and repr(str(text)) in err
        return
    s = res
    starts = [a for a, _ in s.entries]
    assert all(length > 0 for _, length in s.entries) and all(a >= 0 for a in starts)
    assert starts == sorted(set(starts))  # strictly increasing
    assert s.default_len == default_len
    assert parse_schedule(s.to_string(), default_len) == s  # canonical form round-trips

    def brute(i):  # the last entry started at or before i, else the default
        return ([default_len] + [length for a, length in s.entries if a <= i])[-1]

    probe = sorted({0, max(total - 1, 0), *starts, *(max(a - 1, 0) for a in starts)})
    for i in probe:
        assert s.length_at(i) == brute(i)
    used = [s.length_at(i) for i in probe if i < total]
    assert s.max_length(total) == (max(used) if used else s.length_at(0))
    assert set(s.lengths_until(total)) == set(used)
    b = s.boundaries(total)
    if total > 0:
        assert b[0][0] == 0 and [st_ for st_, _ in b] == sorted(st_ for st_, _ in b)
        assert all(s.length_at(step) == length for step, length in b)


# ================================================================ 3. --mesh


_MESH_PIECES = st.sampled_from(["data", "fsdp", "tensor", "=", ",", " ", "-1", "0", "1", "2", "4", "8",
                                "3", "x", "1.5", "+2", "_", "٤", "\n", "9" * 4400, "data=2", "fsdp=-1"])
_WS = st.sampled_from(["", "", " ", "\t"])
_MESH_PAIR = st.tuples(_WS, st.sampled_from(["data", "data", "fsdp", "fsdp", "tensor", "", "Data"]), _WS,
                       st.sampled_from(["=", "=", "=", ":", ""]), _WS,
                       st.one_of(st.integers(-2, 9).map(str), st.sampled_from(["", "x", "2.0", "+2", "1_6", "٤"])),
                       _WS).map("".join)
_CLEAN_MESH = st.dictionaries(st.sampled_from(MESH_AXES), st.integers(-1, 8), min_size=1).map(
    lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
_TEXTS_MESH = st.one_of(_CLEAN_MESH, st.lists(_MESH_PAIR, min_size=1, max_size=3).map(",".join),
                        st.lists(_MESH_PIECES, max_size=10).map("".join), st.text(max_size=20), st.none(),
                        st.sampled_from(["", "1", "none", "data=-1,fsdp=-1", "data=2,data=2"]))


@props(300)
@given(text=_TEXTS_MESH, batch=st.integers(1, 64), data=st.data())
def test_mesh_any_text_is_valid_axes_or_one_line_error(text, batch, data):
    axes, err = outcome(lambda: parse_mesh(text))
    if err is not None:
        assert "--mesh" in err and repr(text) in err
        return
    event(f"axes {'+'.join(sorted(axes)) or 'none'}{' with -1' if -1 in axes.values() else ''}")
    # any device count, or often one the axes can use (their product, times k for a -1 axis)
    fit = math.prod(abs(v) for v in axes.values()) * data.draw(st.integers(1, 4))
    n_devices = data.draw(st.one_of(st.integers(1, 64), st.just(fit)))
    assert set(axes) <= set(MESH_AXES)
    assert all(isinstance(v, int) and (v >= 1 or v == -1) for v in axes.values())
    assert list(axes.values()).count(-1) <= 1
    unresolved = resolve_mesh(axes, None)  # the syntax alone: -1 kept
    assert unresolved == {a: axes.get(a, 1) for a in MESH_AXES}
    assert resolve_mesh(parse_mesh(mesh_text(axes)), None) == (unresolved if axes else {"data": 1, "fsdp": 1})

    # against a device count: every device used, -1 = the rest
    full, err = outcome(lambda: resolve_mesh(axes, n_devices))
    known = math.prod(v for v in unresolved.values() if v != -1)
    if not axes:
        ok = True
    elif -1 in axes.values():
        ok = n_devices % known == 0
    else:
        ok = known == n_devices
    assert (err is None) == ok, (axes, n_devices, err)
    if err is not None:
        assert str(n_devices) in err
    else:
        assert set(full) == set(MESH_AXES) and all(isinstance(v, int) and v >= 1 for v in full.values())
        assert math.prod(full.values()) == (n_devices if axes else 1)
        assert all(full[a] == v for a, v in axes.items() if v != -1)

        # the global batch splits evenly over both (batch) axes, or a one-line error naming it
        _, err = outcome(lambda: check_batch(full, batch))
        assert (err is None) == (batch % math.prod(full.values()) == 0), (full, batch, err)
        if err is not None:
            assert f"--batch-size {batch}" in err
    # before JAX starts (train/args.py): only the axes given count, a -1 is not known yet
    _, err = outcome(lambda: check_batch(axes, batch))
    assert (err is None) == (batch % math.prod(v for v in axes.values() if v > 0) == 0)


# ================================================================ 4. KV quantizers


KINDS = ("q8_0", "q4_0", "nf4")
LEVELS = np.asarray(NF4_LEVELS, np.float64)
# Half the largest distance from any value in range to its nearest code, in units of the scale.
HALF_STEP = {"q8_0": 0.5, "q4_0": 0.5, "nf4": float(np.max(np.diff(LEVELS))) / 2}
CODE_RANGE = {"q8_0": (-127, 127), "q4_0": (-8, 7), "nf4": (-1.0, 1.0)}
QMAX = {"q8_0": 127.0, "q4_0": 7.0, "nf4": 1.0}
FP16_MAX = 65504.0


def codes_of(q: np.ndarray, kind: str, pad_dim: int) -> np.ndarray:
    """Code values (float64, (rows, pad_dim)) decoded from the stored bytes, independently."""
    q = q.reshape(-1, q.shape[-1])
    if kind == "q8_0":
        return q.astype(np.float64)
    u = np.empty((q.shape[0], pad_dim), np.int64)
    u[:, 0::2], u[:, 1::2] = q >> 4, q & 15  # even channel in the high nibble
    return (u - 8).astype(np.float64) if kind == "q4_0" else LEVELS[u]


def both_quantize(x: np.ndarray, kind: str, qblock: int):
    """JAX and torch quantize + dequantize; asserts identical bytes and values, returns numpy."""
    jq, js = jkv.quantize(jnp.asarray(x), kind, qblock)
    tq, ts = tkv.quantize(torch.from_numpy(x.copy()), kind, qblock)
    jq, js, tq, ts = np.asarray(jq), np.asarray(js), tq.numpy(), ts.numpy()
    np.testing.assert_array_equal(jq, tq)
    np.testing.assert_array_equal(js.view(np.uint16), ts.view(np.uint16))
    dim = x.shape[-1]
    dj = np.asarray(jkv.dequantize(jnp.asarray(jq), jnp.asarray(js), kind, dim, qblock))
    dt = tkv.dequantize(torch.from_numpy(jq.copy()), torch.from_numpy(js.copy()), kind, dim, qblock).numpy()
    np.testing.assert_array_equal(dj, dt)
    return jq, js, dj


def check_round_trip(x: np.ndarray, kind: str, qblock: int):
    """No NaN/Inf anywhere, dq == code * fp16 scale exactly, and |x - dq| within the bound."""
    jq, js, dq = both_quantize(x, kind, qblock)
    rows, dim = x.shape
    qb, pad_dim, nb = quant_layout(kind, dim, qblock)
    assert np.isfinite(js).all() and (js >= 0).all() and np.isfinite(dq).all()
    assert dq.shape == x.shape and dq.dtype == np.float32

    # The block scale the codes were computed with: absmax / qmax in fp32, floored at 1e-8 and
    # capped at the largest fp16 (so what is stored is that value rounded to fp16, never inf).
    xp = np.zeros((rows, pad_dim), np.float32)
    xp[:, :dim] = x
    amax = np.abs(xp.reshape(rows, nb, qb)).max(axis=-1)
    s32 = np.clip(amax / np.float32(QMAX[kind]), np.float32(1e-8), np.float32(FP16_MAX)).astype(np.float32)
    np.testing.assert_array_equal(js.view(np.uint16), s32.astype(np.float16).view(np.uint16))

    c = codes_of(jq, kind, pad_dim)[:, :dim]
    s32e = np.repeat(s32.astype(np.float64), qb, axis=-1)[:, :dim]
    s16e = np.repeat(js.astype(np.float64), qb, axis=-1)[:, :dim]
    np.testing.assert_array_equal(dq, (c * s16e).astype(np.float32))
    xd = x.astype(np.float64)
    lo, hi = CODE_RANGE[kind]
    # Nearest code to x / s32 (half a step; the fp32 division adds an ulp), then the product with
    # the fp16-rounded scale moves it by |code| * |s16 - s32|; only a block capped at 65504
    # leaves values outside [lo, hi] * scale, which saturate to the end codes.
    beyond = np.maximum(0.0, np.maximum(xd - hi * s32e, lo * s32e - xd))
    bound = HALF_STEP[kind] * s32e * (1 + 1e-5) + np.abs(c) * np.abs(s16e - s32e) + beyond + 1e-6 * np.abs(xd)
    err = np.abs(dq.astype(np.float64) - xd)
    assert np.all(err <= bound), (float(np.max(err - bound)), kind, qblock)
    return jq, js, dq


# Values for an array: mostly "simple" floats hypothesis likes (integers, halves: the ties that
# round-half-to-even decides) in the fp16-scale range, with tiny, subnormal and zero values mixed in.
_IN_RANGE = st.one_of(
    st.floats(-6e4, 6e4, width=32),
    st.integers(-16, 16).map(float),
    st.integers(-32, 32).map(lambda v: v / 2),
    st.floats(-2.0**-100, 2.0**-100, width=32),
    st.sampled_from([0.0, -0.0, 1e-45, -1e-45, 1.17549435e-38, 5.96e-8, 6e4, -6e4, 65504.0 / 127 * 126]),
)


@st.composite
def quant_cases(draw, elements):
    kind = draw(st.sampled_from(KINDS))
    dim = draw(st.integers(1, 70))
    qblock = draw(st.one_of(st.just(0), st.integers(1, 40)))
    rows = draw(st.integers(1, 3))
    if draw(st.integers(0, 2)) == 0:
        # (Near-)ties: every block's absmax pinned at A, the others at k/2 * fl(A / qmax), so
        # x / scale is k/2 to within an ulp and round-half-to-even (or the nearest NF4 level)
        # decides on the last bit of the quotient; any ulp lost in the division (a multiply by a
        # rounded reciprocal) flips the code. A = n * 2**e with n not a power of two.
        m = QMAX[kind]
        amax = np.float32(draw(st.integers(3, 255)) * 2.0 ** draw(st.integers(-24, 8)))
        unit = np.float32(amax / np.float32(m))
        k = draw(hnp.arrays(np.int32, (rows, dim), elements=st.integers(-2 * int(m), 2 * int(m))))
        x = (k.astype(np.float32) / np.float32(2) * unit).astype(np.float32)
        x[:, ::quant_layout(kind, dim, qblock)[0]] = amax
        return kind, qblock, x
    x = draw(hnp.arrays(np.float32, (rows, dim), elements=elements, fill=st.just(np.float32(0.0))))
    if draw(st.booleans()):  # per-row magnitudes from 1e-7 to 1e4: scale, keep ties relative
        x = (x * np.float32(10.0 ** draw(st.integers(-7, 0)))).astype(np.float32)
    return kind, qblock, x


@pytest.mark.slow
@props(80)
@given(case=quant_cases(_IN_RANGE))
def test_quantize_any_finite_input_in_fp16_scale_range(case):
    """|x| <= 6e4 (every scale representable in fp16): the SPEC's bytes exactly, in both
    frameworks, and the round trip within the format's bound."""
    kind, qblock, x = case
    jq, js, _ = check_round_trip(x, kind, qblock)
    rq, rs, _, _ = ref_quantize(x, kind, qblock)  # SPEC §5 typed in plain numpy
    np.testing.assert_array_equal(jq, rq)
    np.testing.assert_array_equal(js.view(np.uint16), rs.view(np.uint16))


@pytest.mark.slow
@props(60)
@given(case=quant_cases(st.one_of(st.floats(width=32, allow_nan=False, allow_infinity=False),
                                  st.sampled_from([3.4028235e38, -3.4028235e38, 65520.0, 8.4e6, -5e5]))))
def test_quantize_any_finite_fp32_input_stays_finite(case):
    """Beyond the fp16 range the SPEC's literal cast would store an inf scale (dequantized to
    inf, and 0 * inf = NaN for the zeros of the block). The scale is capped at 65504 instead:
    such a block saturates (values past qmax * 65504 clip to the end codes), nothing is inf."""
    kind, qblock, x = case
    check_round_trip(x, kind, qblock)


@props(40)
@given(kind=st.sampled_from(KINDS), dim=st.integers(1, 40), qblock=st.integers(0, 16),
       data=st.data())
def test_dequantize_any_stored_bytes_is_finite_and_identical(kind, dim, qblock, data):
    """Whatever the bytes in a cache (a corrupt or uninitialised one), decoding with finite fp16
    scales gives finite values, the same in both frameworks."""
    qb, pad_dim, nb = quant_layout(kind, dim, qblock)
    width = pad_dim if kind == "q8_0" else pad_dim // 2
    q = data.draw(hnp.arrays(np.int8 if kind == "q8_0" else np.uint8, (2, width)))
    s = data.draw(hnp.arrays(np.float16, (2, nb), elements=st.floats(width=16, allow_nan=False,
                                                                     allow_infinity=False)))
    dj = np.asarray(jkv.dequantize(jnp.asarray(q), jnp.asarray(s), kind, dim, qblock))
    dt = tkv.dequantize(torch.from_numpy(q), torch.from_numpy(s), kind, dim, qblock).numpy()
    np.testing.assert_array_equal(dj, dt)
    assert np.isfinite(dj).all() and dj.shape == (2, dim)


@pytest.mark.slow
@props(40)
@given(case=quant_cases(st.floats(-100, 100, width=32)), data=st.data())
def test_non_finite_input_refused_in_one_line_and_confined_when_traced(case, data):
    """The eager entry points refuse NaN/Inf with one line counting them; under jit the values
    cannot be inspected (no exception, no host sync in decode): a NaN/Inf then spoils only the
    codes of its own block."""
    kind, qblock, x = case
    rows, dim = x.shape
    cells = data.draw(st.lists(st.tuples(st.integers(0, rows - 1), st.integers(0, dim - 1)),
                               min_size=1, max_size=4, unique=True))
    bad = x.copy()
    for r, c in cells:
        bad[r, c] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    n_nan, n_inf = int(np.isnan(bad).sum()), int(np.isinf(bad).sum())
    for quantize in (lambda: jkv.quantize(jnp.asarray(bad), kind, qblock),
                     lambda: tkv.quantize(torch.from_numpy(bad.copy()), kind, qblock)):
        with pytest.raises(ValueError) as e:
            quantize()
        msg = str(e.value)
        assert len(msg.splitlines()) == 1 and "non-finite" in msg
        assert f"{n_nan} NaN" in msg and f"{n_inf} inf" in msg

    jq, js = jax.jit(lambda a: jkv.quantize(a, kind, qblock))(jnp.asarray(bad))  # no raise
    tq, ts = tkv.quantize(torch.from_numpy(bad.copy()), kind, qblock, check_finite=False)
    rq, rs = jkv.quantize(jnp.asarray(x), kind, qblock)  # the same rows without the bad values
    qb, pad_dim, nb = quant_layout(kind, dim, qblock)
    per_block = qb if kind == "q8_0" else qb // 2  # payload bytes per block
    spoiled = {(r, c // qb) for r, c in cells}
    for r in range(rows):
        for b in range(nb):
            if (r, b) in spoiled:
                continue
            cols = slice(b * per_block, (b + 1) * per_block)
            for q, s in ((np.asarray(jq), np.asarray(js)), (tq.numpy(), ts.numpy())):
                np.testing.assert_array_equal(q[r, cols], np.asarray(rq)[r, cols])
                np.testing.assert_array_equal(s[r, b:b + 1].view(np.uint16), np.asarray(rs)[r, b:b + 1].view(np.uint16))


def test_xla_division_rewrite_does_not_change_codes():
    """The failing example that found the bug: [6, 3, 0, -2] has scale 6/7 and 3/scale = 3.5, a
    tie SPEC rounds to even (4). XLA rewrote `x / scale` as `x * (1/scale)` = 3.4999998 and
    stored code 3 (byte 251, SPEC's is 252), at every magnitude not a power-of-two multiple."""
    for m in (0.6, 6.0, 60.0, 6e4):
        x = np.array([[m, m / 2, 0.0, -m / 3]], np.float32)
        for kind in KINDS:
            jq, js, _ = check_round_trip(x, kind, 4)
            rq, _, _, _ = ref_quantize(x, kind, 4)
            np.testing.assert_array_equal(jq, rq)
        jq = jax.jit(lambda a: jkv.quantize(a, "q4_0", 4))(jnp.asarray(x))[0]  # inside an outer jit too
        assert np.asarray(jq).tolist() == [[252, 134]]


def test_beyond_fp16_scale_saturates_instead_of_nan():
    # nf4 block with absmax 1e5 (> 65504): the stored scale is 65504, the zero stays 0 (not
    # 0 * inf = NaN) and the largest value saturates at 65504.
    x = np.array([[1e5, 0.0, -3e4, 2e4]], np.float32)
    jq, js, dq = check_round_trip(x, "nf4", 4)
    assert float(js[0, 0]) == FP16_MAX and dq[0, 0] == FP16_MAX and dq[0, 1] == 0.0
