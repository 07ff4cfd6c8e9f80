"""dba.torchfile.read_pt: torch-free, weights-only reader for torch.save zip checkpoints.

Round trips against the real torch.save (torch is available to the tests, never to the module
under test), ties, the v29 fixture, and hostile / broken files.
"""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dba import torchfile  # noqa: E402
from dba.errors import UserError  # noqa: E402
from dba.torchfile import TorchDtype, read_pt  # noqa: E402
from tests.support import v29_fixture  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FIXTURE = v29_fixture("dec_plain") / "best.pt"


# --------------------------------------------------------------------------- helpers

def save_load(tmp_path, obj, name="ck.pt", **kw):
    p = tmp_path / name
    torch.save(obj, p, **kw)
    return read_pt(p)


def np_of(t: "torch.Tensor") -> np.ndarray:
    """Reference numpy value of a torch tensor (bf16 compared via its float32 value)."""
    t = t.detach().resolve_conj().resolve_neg()
    if t.dtype == torch.bfloat16:
        return t.float().numpy()
    return t.numpy()


def assert_tensor_equal(arr, t):
    assert isinstance(arr, np.ndarray), type(arr)
    assert arr.shape == tuple(t.shape)
    assert arr.flags.c_contiguous and arr.flags.writeable
    if t.dtype == torch.bfloat16:
        assert arr.dtype.name == "bfloat16"
        np.testing.assert_array_equal(
            arr.view(np.uint16), t.contiguous().view(torch.int16).numpy().view(np.uint16)
        )
    else:
        ref = np_of(t)
        assert arr.dtype == ref.dtype, (arr.dtype, ref.dtype)
        np.testing.assert_array_equal(arr, ref)


def assert_same_tree(ours, theirs):
    """Structure and values of read_pt output equal torch.load's."""
    if isinstance(theirs, torch.Tensor):
        assert_tensor_equal(ours, theirs)
    elif isinstance(theirs, dict):
        assert type(ours) is type(theirs)
        assert list(ours.keys()) == list(theirs.keys())
        for k in theirs:
            assert_same_tree(ours[k], theirs[k])
    elif isinstance(theirs, (list, tuple)):
        assert type(ours) is type(theirs) or (isinstance(theirs, torch.Size) and type(ours) is tuple)
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            assert_same_tree(a, b)
    elif isinstance(theirs, float) and theirs != theirs:
        assert ours != ours
    else:
        assert type(ours) is type(theirs) and ours == theirs, (ours, theirs)


def expect_user_error(path, *fragments):
    with pytest.raises(UserError) as ei:
        read_pt(path)
    err = ei.value
    msg = str(err)
    assert err.code == 1
    assert "\n" not in msg, msg
    for f in fragments:
        assert f in msg, msg
    return msg


# tiny protocol-2 pickle emitter for hand-built (possibly hostile) data.pkl records
def p_int(v):
    return b"J" + struct.pack("<i", v)


def p_str(s):
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def p_tuple(*items):
    return b"(" + b"".join(items) + b"t"


def p_global(module, name):
    return b"c" + f"{module}\n{name}\n".encode()


def p_call(fn, *args):
    return fn + p_tuple(*args) + b"R"


def tensor_pkl(storage_cls="FloatStorage", key="0", numel=4, offset=0, size=(4,), stride=(1,),
               storage_module="torch"):
    storage = p_tuple(p_str("storage"), p_global(storage_module, storage_cls), p_str(key),
                      p_str("cpu"), p_int(numel)) + b"Q"
    return (b"\x80\x02" + p_call(
        p_global("torch._utils", "_rebuild_tensor_v2"), storage, p_int(offset),
        p_tuple(*map(p_int, size)), p_tuple(*map(p_int, stride)), b"\x89",
        p_call(p_global("collections", "OrderedDict")),
    ) + b".")


def make_pt(path, pkl: bytes | None, records: dict[str, bytes] | None = None, root="archive"):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        if pkl is not None:
            z.writestr(f"{root}/data.pkl", pkl)
        z.writestr(f"{root}/byteorder", "little")
        for k, v in (records or {}).items():
            z.writestr(f"{root}/data/{k}", v)
    return path


# --------------------------------------------------------------------------- isolation

@pytest.mark.slow
def test_module_imports_no_framework():
    code = (
        "import sys, dba.torchfile as tf\n"
        f"d = tf.read_pt({str(FIXTURE)!r})\n"
        "bad = [m for m in ('torch', 'jax', 'flax') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "assert d['config']['attn_mode'] == 'decoupled'\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


# --------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("dtype", [
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64,
])
def test_dtypes_round_trip(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(5, 7, generator=g) * 50
    if dtype == torch.bool:
        t = base > 0
    elif dtype == torch.complex64:
        t = torch.complex(base, -base)
    else:
        t = base.to(dtype)
    out = save_load(tmp_path, {"t": t, "s": t[2, 3].clone(), "e": t[:0]})
    assert_tensor_equal(out["t"], t)
    assert out["s"].shape == ()  # 0-d scalar
    assert_tensor_equal(out["s"], t[2, 3])
    assert out["e"].shape == (0, 7)
    assert out["e"].dtype == out["t"].dtype


def test_new_dtypes_via_untyped_storage(tmp_path):
    u16 = torch.tensor([1, 2, 3, 65535], dtype=torch.int32).to(torch.uint16)
    f8 = torch.tensor([0.5, -2.0, 448.0]).to(torch.float8_e4m3fn)
    out = save_load(tmp_path, {"u": u16, "f8": f8})
    assert out["u"].dtype == np.uint16
    assert out["u"].tolist() == [1, 2, 3, 65535]
    assert out["f8"].dtype.name == "float8_e4m3fn"
    assert out["f8"].astype(np.float32).tolist() == [0.5, -2.0, 448.0]


def test_bf16_without_ml_dtypes_is_bit_exact_fp32(tmp_path, monkeypatch):
    t = torch.randn(64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    t[0] = float("inf")
    t[1] = -0.0
    p = tmp_path / "bf.pt"
    torch.save({"w": t, "v": t[::3]}, p)
    monkeypatch.setattr(torchfile, "_ml", None)
    out = read_pt(p)
    assert out["w"].dtype == np.float32
    np.testing.assert_array_equal(out["w"].view(np.uint32), t.float().numpy().view(np.uint32))
    np.testing.assert_array_equal(out["v"], t[::3].float().numpy())
    assert out["w"].flags.writeable and out["w"].flags.c_contiguous


def test_scalars_and_empty(tmp_path):
    obj = {
        "f": torch.tensor(3.5), "i": torch.tensor(7), "b": torch.tensor(True),
        "e1": torch.empty(0), "e2": torch.zeros(4, 0, 2, dtype=torch.int8),
        "e3": torch.empty(0, dtype=torch.bfloat16),
    }
    out = save_load(tmp_path, obj)
    assert out["f"].shape == () and out["f"].dtype == np.float32 and out["f"] == 3.5
    assert out["i"].shape == () and out["i"].dtype == np.int64 and out["i"] == 7
    assert out["b"].shape == () and out["b"].dtype == np.bool_ and bool(out["b"])
    assert out["e1"].shape == (0,) and out["e1"].dtype == np.float32
    assert out["e2"].shape == (4, 0, 2) and out["e2"].dtype == np.int8
    assert out["e3"].shape == (0,)


def test_non_contiguous_views(tmp_path):
    t = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    views = {
        "T": t.t(), "slice": t[2:, 3:7], "step": t[1::2, ::3], "row": t[4],
        "col": t[:, 5], "expand": torch.arange(3.0)[:, None].expand(3, 4),
        "perm": torch.arange(24).reshape(2, 3, 4).permute(2, 0, 1),
        "tail": torch.arange(10, dtype=torch.int16)[7:],
    }
    out = save_load(tmp_path, views)
    for k, v in views.items():
        assert_tensor_equal(out[k], v)
        assert out[k].base is None or out[k].base.flags.owndata


def test_ties_come_back_as_one_object(tmp_path):
    w = torch.randn(4, 3)
    other_view_a, other_view_b = w[1:], w[1:]  # two torch objects, same storage/offset/shape
    assert other_view_a is not other_view_b
    out = save_load(tmp_path, {
        "q": w, "k": w, "a": other_view_a, "b": other_view_b, "row": w[2],
        "nested": [w, {"again": w}],
    })
    assert out["q"] is out["k"] is out["nested"][0] is out["nested"][1]["again"]
    assert out["a"] is out["b"]
    assert out["a"] is not out["q"]  # a different view of the same storage: a separate copy
    np.testing.assert_array_equal(out["a"], w[1:].numpy())
    np.testing.assert_array_equal(out["row"], w[2].numpy())


class _TiedQK(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(6, 4, bias=False)
        self.k = torch.nn.Linear(6, 4, bias=False)
        self.k.weight = self.q.weight  # tie_qk
        self.bn = torch.nn.BatchNorm1d(4)  # buffers incl. 0-d int64 num_batches_tracked


def test_module_state_dict_with_tie(tmp_path):
    m = _TiedQK()
    sd = m.state_dict()
    out = save_load(tmp_path, sd)
    assert isinstance(out, OrderedDict)
    assert list(out) == list(sd)
    assert out["q.weight"] is out["k.weight"]
    assert out["bn.num_batches_tracked"].shape == () and out["bn.num_batches_tracked"].dtype == np.int64
    assert out._metadata == sd._metadata  # BUILD of OrderedDict attributes survives
    assert_same_tree(out, torch.load(tmp_path / "ck.pt", weights_only=True))


def test_v29_like_payload_with_optimizer_and_scaler(tmp_path):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    m(torch.randn(2, 5)).square().mean().backward()
    opt.step()
    payload = {
        "config": {"d_model": 64, "rope": True, "kv_head": None, "rope_base": 10000.0,
                   "attn_mode": "decoupled", "dropout": 0.0},
        "model": m.state_dict(),
        "step": 123,
        "best_val": 2.5,
        "opt": opt.state_dict(),
        "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                   "growth_interval": 2000, "_growth_tracker": 0},
    }
    out = save_load(tmp_path, payload)
    ref = torch.load(tmp_path / "ck.pt", weights_only=True)
    assert_same_tree(out, ref)
    assert out["opt"]["param_groups"][0]["params"] == [0, 1, 2, 3]
    assert isinstance(out["opt"]["state"][0]["step"], np.ndarray)


def test_nested_plain_python(tmp_path):
    obj = {
        "ints": [1, -2, 2**40], "floats": (0.5, float("inf"), float("nan")),
        "s": "héllo", "none": None, "flags": [True, False], "bytes": b"\x00\xffab",
        "set": {1, 2, 3}, "fs": frozenset({"a"}), "c": complex(1, -2),
        "deep": {"a": [{"b": (1, [2, {"c": None}])}]}, "empty": ({}, [], ()),
        "size": torch.Size([2, 3]), "dtype": torch.bfloat16,
    }
    out = save_load(tmp_path, obj)
    assert out["ints"] == [1, -2, 2**40]
    assert out["floats"][:2] == (0.5, float("inf")) and out["floats"][2] != out["floats"][2]
    assert out["s"] == "héllo" and out["none"] is None and out["flags"] == [True, False]
    assert out["bytes"] == b"\x00\xffab"
    assert out["set"] == {1, 2, 3} and out["fs"] == frozenset({"a"}) and out["c"] == complex(1, -2)
    assert out["deep"] == {"a": [{"b": (1, [2, {"c": None}])}]}
    assert out["empty"] == ({}, [], ())
    assert out["size"] == (2, 3) and type(out["size"]) is tuple
    assert isinstance(out["dtype"], TorchDtype) and out["dtype"] == str(torch.bfloat16)


def test_top_level_tensor_parameters_and_attributes(tmp_path):
    p = torch.nn.Parameter(torch.randn(3, 2))
    t = torch.randn(4)
    t.note = "attr"  # pickled via torch._tensor._rebuild_from_type_v2
    p2 = torch.nn.Parameter(torch.ones(2))
    p2.extra = 1  # _rebuild_parameter_with_state
    assert_tensor_equal(save_load(tmp_path, t[1:], name="a.pt"), t[1:])
    out = save_load(tmp_path, {"p": p, "t": t, "p2": p2}, name="b.pt")
    assert_tensor_equal(out["p"], p)
    assert_tensor_equal(out["t"], t)
    assert_tensor_equal(out["p2"], p2)


def test_conj_and_neg_views(tmp_path):
    z = torch.complex(torch.arange(4.0), torch.ones(4))
    conj = save_load(tmp_path, z.conj(), name="c.pt")  # saved with metadata {'conj': True}
    np.testing.assert_array_equal(conj, z.conj().resolve_conj().numpy())
    neg = save_load(tmp_path, z.conj().imag, name="n.pt")  # a neg-bit view
    np.testing.assert_array_equal(neg, z.conj().imag.resolve_neg().numpy())
    assert neg.tolist() == [-1.0] * 4


def test_big_endian_byteorder_record(tmp_path):
    src = tmp_path / "le.pt"
    vals = {"f": torch.randn(3, 4), "h": torch.randn(5).half(), "b": torch.randn(6).bfloat16(),
            "i": torch.arange(-3, 3), "u": torch.arange(4, dtype=torch.uint8)}
    torch.save(vals, src)
    sizes = {"f": 4, "h": 2, "b": 2, "i": 8, "u": 1}
    ref = read_pt(src)
    # rewrite with byteorder=big and every storage byte-swapped per element
    keymap = {}
    with zipfile.ZipFile(src) as z:
        pkl = z.read("le/data.pkl")
        data = {n: z.read(n) for n in z.namelist()}
    # map storage key -> element size using the tensor order in the dict (keys '0'..'4')
    for i, k in enumerate(vals):
        keymap[str(i)] = sizes[k]
    dst = tmp_path / "be.pt"
    with zipfile.ZipFile(dst, "w") as z:
        for n, b in data.items():
            if n == "le/byteorder":
                b = b"big"
            elif n.startswith("le/data/"):
                sz = keymap[n.rsplit("/", 1)[1]]
                b = np.frombuffer(b, np.uint8).reshape(-1, sz)[:, ::-1].tobytes()
            z.writestr(n, b)
    out = read_pt(dst)
    for k in vals:
        assert out[k].dtype == ref[k].dtype
        np.testing.assert_array_equal(out[k], ref[k])
    assert pkl  # sanity


def test_real_v29_fixture_matches_torch_load():
    ours = read_pt(FIXTURE)
    ref = torch.load(FIXTURE, weights_only=True, map_location="cpu")
    assert set(ours) == set(ref)
    assert ours["config"] == ref["config"]
    assert ours["step"] == ref["step"]
    assert ours["best_val"] == ref["best_val"] or (ours["best_val"] != ours["best_val"]
                                                   and ref["best_val"] != ref["best_val"])
    assert isinstance(ours["model"], OrderedDict)
    assert list(ours["model"]) == list(ref["model"])
    for k, t in ref["model"].items():
        assert_tensor_equal(ours["model"][k], t)
    assert_same_tree(ours, ref)


# --------------------------------------------------------------------------- hostile / broken

class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_reduce_is_refused_before_running(tmp_path):
    marker = tmp_path / "pwned"
    # the payload is live: a plain unpickler runs it
    live = tmp_path / "live.pt"
    torch.save({"x": _Evil(marker)}, live)
    with zipfile.ZipFile(live) as z:
        pickle.loads(z.read("live/data.pkl"))
    assert marker.exists()
    marker.unlink()
    expect_user_error(live, "refusing to load", "system")
    assert not marker.exists()

    # the same after real tensors, as in a doctored checkpoint
    p = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.ones(2)}, "x": _Evil(marker)}, p)
    msg = expect_user_error(p, "refusing to load", "system", "weights-only")
    assert not marker.exists()
    assert msg.startswith(f"refusing to load {str(p)!r}: it references ")


@pytest.mark.parametrize("module,name", [
    ("__builtin__", "eval"), ("builtins", "exec"), ("os", "system"), ("subprocess", "Popen"),
    ("torch", "load"), ("torch._utils", "_rebuild_device_tensor_from_numpy"),
    ("numpy.core.multiarray", "_reconstruct"), ("collections", "defaultdict"),
    ("builtins", "getattr"), ("torch.nn.modules.linear", "Linear"),
])
def test_non_whitelisted_globals_refused(tmp_path, module, name):
    pkl = b"\x80\x02" + p_call(p_global(module, name), p_str("print(1)")) + b"."
    p = make_pt(tmp_path / "g.pt", pkl)
    msg = expect_user_error(p, "refusing to load", "weights-only checkpoint never needs")
    assert name in msg


def test_hand_built_record_reads(tmp_path):
    data = np.arange(4, dtype="<f4").tobytes()
    p = make_pt(tmp_path / "ok.pt", tensor_pkl(), {"0": data})
    np.testing.assert_array_equal(read_pt(p), np.arange(4, dtype=np.float32))


@pytest.mark.parametrize("kw,frag", [
    (dict(numel=8), "too short"),  # storage claims more elements than the record holds
    (dict(size=(5,)), "too short"),  # tensor runs past the end of its storage
    (dict(offset=2, size=(2, 2), stride=(2, 1)), "too short"),  # strided read past the end
    (dict(size=(2,), stride=(-1,)), "malformed"),
    (dict(size=(2, 2), stride=(1,)), "malformed"),
    (dict(storage_cls="QInt8Storage"), "unknown storage dtype"),
    (dict(storage_cls="NotAStorage"), "unknown storage dtype"),
    (dict(storage_cls="FloatStorage", storage_module="torch.nn"), "refusing to load"),
    (dict(key="1"), "missing"),
])
def test_bad_tensor_records(tmp_path, kw, frag):
    data = np.arange(4, dtype="<f4").tobytes()
    p = make_pt(tmp_path / "bad.pt", tensor_pkl(**kw), {"0": data})
    expect_user_error(p, frag)


def test_storage_record_too_short_in_real_file(tmp_path):
    src = tmp_path / "src.pt"
    torch.save({"w": torch.randn(100)}, src)
    dst = tmp_path / "short.pt"
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w") as zo:
        for n in zi.namelist():
            b = zi.read(n)
            zo.writestr(n, b[:40] if n == "src/data/0" else b)
    expect_user_error(dst, "too short")


def test_missing_file_and_directory(tmp_path):
    expect_user_error(tmp_path / "nope.pt", "does not exist")
    expect_user_error(tmp_path, "directory")


def test_empty_garbage_truncated_legacy(tmp_path):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    expect_user_error(empty, "empty")

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(4096).replace(b"PK", b"pk"))
    expect_user_error(garbage, "not a zip")

    full = tmp_path / "full.pt"
    torch.save({"w": torch.randn(256, 64)}, full)
    half = tmp_path / "half.pt"
    half.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    expect_user_error(half, "truncated or corrupt zip")

    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(3)}, legacy, _use_new_zipfile_serialization=False)
    expect_user_error(legacy, "legacy")


def test_zip_without_data_pkl(tmp_path):
    p = tmp_path / "nodata.pt"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("archive/other.txt", "hi")
    expect_user_error(p, "data.pkl")


def test_corrupt_data_pkl(tmp_path):
    p = make_pt(tmp_path / "junk.pt", b"\x80\x02not a pickle at all")
    expect_user_error(p, "malformed data.pkl")
    p2 = make_pt(tmp_path / "trunc.pt", tensor_pkl()[:-20], {"0": b"\0" * 16})
    expect_user_error(p2, "malformed data.pkl")
