"""Read PyTorch ``.pt`` checkpoints (``torch.save`` zip format, torch >= 1.6) without torch.

``read_pt(path)`` returns the saved payload with every tensor replaced by a contiguous numpy
array.  It is a *weights-only* reader, in the spirit of ``torch.load(weights_only=True)``:
the pickle in ``data.pkl`` is run by a restricted unpickler whose ``find_class`` resolves a
short whitelist of names to this module's own stand-ins (the real ``torch`` is never
imported).  Any other global -- ``os.system``, ``builtins.eval``, a user class -- is refused
when the pickle names it, before anything it could call has run.

What comes back:

* tensors -> ``numpy.ndarray`` (C-contiguous, writable copies).  bf16 -> ``ml_dtypes.bfloat16``
  when ml_dtypes is importable, else a bit-exact float32 upcast.  float8 and the unsigned
  16/32/64-bit types need ml_dtypes / numpy respectively (float8 without ml_dtypes is an error).
* ties: two entries that are the same tensor object in the checkpoint, or two tensors viewing
  the same storage with the same offset/shape/strides/dtype, come back as the *same* ndarray
  object (``a is b``), so callers can detect tied weights with ``is``.
* ``torch.Size`` -> ``tuple``; torch dtype objects -> :class:`TorchDtype` (a ``str`` such as
  ``"torch.float16"``, equal to ``str(torch.float16)``); ``OrderedDict`` stays ``OrderedDict``;
  ``set``/``frozenset``/``complex``/``bytes``/``bytearray`` as usual.

Every failure is a one-line :class:`dba.errors.UserError` with exit code 1.
"""

from __future__ import annotations

import _compat_pickle
import io
import os
import pickle
import zipfile
import zlib
from collections import OrderedDict
from typing import Any

import numpy as np

from dba.errors import UserError

try:  # optional: exact bf16 / float8 dtypes
    import ml_dtypes as _ml
except Exception:  # pragma: no cover - exercised only where ml_dtypes is missing
    _ml = None

__all__ = ["read_pt", "TorchDtype"]

# Legacy (pre-1.6, non-zip) torch.save files begin with this pickled magic number.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


# --------------------------------------------------------------------------- dtypes

class TorchDtype(str):
    """A torch dtype object found in a checkpoint, as its string (``"torch.float16"``)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return str(self)


def _np_dtype(name: str) -> np.dtype | None:
    """numpy dtype for a torch dtype name (without the ``torch.`` prefix); None if unsupported."""
    simple = {
        "float32": "<f4", "float": "<f4", "float64": "<f8", "double": "<f8",
        "float16": "<f2", "half": "<f2",
        "int64": "<i8", "long": "<i8", "int32": "<i4", "int": "<i4",
        "int16": "<i2", "short": "<i2", "int8": "i1", "uint8": "u1", "bool": "?",
        "uint16": "<u2", "uint32": "<u4", "uint64": "<u8",
        "complex64": "<c8", "cfloat": "<c8", "complex128": "<c16", "cdouble": "<c16",
    }
    if name in simple:
        return np.dtype(simple[name])
    if name == "bfloat16":
        return np.dtype(_ml.bfloat16) if _ml is not None else _BF16_UPCAST
    if name.startswith("float8_") and _ml is not None and hasattr(_ml, name):
        return np.dtype(getattr(_ml, name))
    return None


class _BF16Upcast:
    """Marker dtype: bf16 storage read as uint16 and widened to float32 bit-exactly."""


_BF16_UPCAST: Any = _BF16Upcast()

# Every torch dtype name the whitelist recognises as ``torch.<name>`` (values need not be
# readable; an unreadable one errors only if a tensor actually uses it).
_DTYPE_NAMES = frozenset(
    """float32 float float64 double float16 half bfloat16 int64 long int32 int int16 short int8
    uint8 bool uint16 uint32 uint64 complex32 chalf complex64 cfloat complex128 cdouble
    float8_e4m3fn float8_e5m2 float8_e4m3fnuz float8_e5m2fnuz float8_e8m0fnu float4_e2m1fn_x2
    qint8 quint8 qint32 quint4x2 quint2x4 bits8 bits16 bits1x8 bits2x4 bits4x2
    uint1 uint2 uint3 uint4 uint5 uint6 uint7 int1 int2 int3 int4 int5 int6 int7""".split()
)

# Legacy typed storage classes: torch.<Name>Storage -> torch dtype name.
_STORAGE_DTYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
}


class _StorageType:
    """Stand-in for ``torch.FloatStorage`` & co. (and ``torch.storage.UntypedStorage``).

    ``dtype_name`` is None for UntypedStorage (a byte buffer whose element type comes from
    ``_rebuild_tensor_v3``), and ``unknown`` marks a ``torch.*Storage`` we cannot decode.
    """

    def __init__(self, qualname: str, dtype_name: str | None, unknown: bool = False):
        self.qualname = qualname
        self.dtype_name = dtype_name
        self.unknown = unknown

    def __call__(self, *args, **kwargs):
        raise TypeError(f"{self.qualname} is a marker here and cannot be constructed")

    def __repr__(self) -> str:
        return self.qualname


class _Marker:
    """Stand-in for ``torch.Tensor`` / ``torch.nn.Parameter`` as type arguments."""

    def __init__(self, qualname: str):
        self.qualname = qualname

    def __call__(self, *args, **kwargs):
        raise TypeError(f"{self.qualname} is a marker here and cannot be constructed")

    def __repr__(self) -> str:
        return self.qualname


_TENSOR = _Marker("torch.Tensor")
_PARAMETER = _Marker("torch.nn.parameter.Parameter")


# --------------------------------------------------------------------------- storages / tensors

class _Storage:
    """One ``data/<key>`` record, plus the element type it was saved as."""

    __slots__ = ("key", "raw", "stype", "numel")

    def __init__(self, key: str, raw: np.ndarray, stype: _StorageType, numel: int):
        self.key, self.raw, self.stype, self.numel = key, raw, stype, numel


class _TensorRef:
    """Placeholder for a tensor while unpickling; swapped for its ndarray afterwards.

    Keeping numpy arrays out of the pickle machine means a BUILD opcode can never reach
    ``ndarray.__setstate__``; a placeholder simply ignores any state it is given.
    """

    __slots__ = ("array",)
    __hash__ = None  # type: ignore[assignment]  # tensors as dict keys/set members: refuse

    def __init__(self, array: np.ndarray):
        self.array = array

    def __setstate__(self, state):  # python attributes on a tensor: dropped
        pass


def _as_int(x, what: str) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise ValueError(f"malformed tensor record: {what} is {type(x).__name__}, not int")
    return x


def _as_ints(x, what: str) -> tuple[int, ...]:
    if not isinstance(x, (tuple, list)):
        raise ValueError(f"malformed tensor record: {what} is {type(x).__name__}, not a tuple")
    return tuple(_as_int(v, what) for v in x)


class _Reader:
    """Per-file state: the zip, its root folder, and caches of storages and tensors."""

    def __init__(self, path: str, zf: zipfile.ZipFile, root: str, big_endian: bool):
        self.path, self.zf, self.root, self.big_endian = path, zf, root, big_endian
        self.storages: dict[str, np.ndarray] = {}  # key -> raw bytes (uint8)
        self.views: dict[tuple, np.ndarray] = {}  # (key, dtype, view) -> array
        self.tensors: dict[tuple, _TensorRef] = {}

    def fail(self, what: str) -> UserError:
        return UserError(f"cannot read {self.path!r}: {what}", 1)

    # -- persistent ids: ('storage', storage_type, key, location, numel)
    def load_storage(self, pid) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise self.fail(f"unexpected persistent id {pid!r:.80} in data.pkl")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType):
            raise self.fail(f"persistent id names {stype!r:.60}, which is not a storage type")
        if stype.unknown:
            raise self.fail(f"unknown storage dtype {stype.qualname}")
        if not isinstance(key, str) or not key:
            raise self.fail(f"malformed storage key {key!r:.60}")
        numel = _as_int(numel, "storage numel")
        if numel < 0:
            raise self.fail(f"negative storage size {numel}")
        raw = self.storages.get(key)
        if raw is None:
            name = f"{self.root}/data/{key}"
            try:
                data = self.zf.read(name)
            except KeyError:
                raise self.fail(f"storage record {name!r} is missing from the archive") from None
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as e:
                raise self.fail(f"storage record {name!r} is corrupt ({e})") from None
            raw = np.frombuffer(data, dtype=np.uint8)
            self.storages[key] = raw
        if stype.dtype_name is None:  # untyped: numel counts bytes
            itemsize = 1
        else:
            dt = _np_dtype(stype.dtype_name)
            if dt is None:
                raise self.fail(f"unknown storage dtype {stype.qualname} (no numpy equivalent)")
            itemsize = 2 if dt is _BF16_UPCAST else dt.itemsize
        if raw.size < numel * itemsize:
            raise self.fail(
                f"storage record {key!r} is too short: {raw.size} bytes for {numel} elements "
                f"of {itemsize} bytes (file truncated or corrupt)"
            )
        return _Storage(key, raw, stype, numel * itemsize)

    def typed(self, st: _Storage, dtype_name: str) -> tuple[np.ndarray, bool]:
        """The storage's bytes viewed as elements; second item says bf16-needs-upcast."""
        dt = _np_dtype(dtype_name)
        if dt is None:
            if dtype_name == "bfloat16" or dtype_name.startswith("float8_"):
                raise self.fail(f"tensors of dtype torch.{dtype_name} need the ml_dtypes package")
            raise self.fail(f"unknown storage dtype torch.{dtype_name}")
        upcast = dt is _BF16_UPCAST
        base = np.dtype("<u2") if upcast else dt
        ck = (st.key, str(base))
        arr = self.views.get(ck)
        if arr is None:
            raw = st.raw[: st.numel]
            n = raw.size // base.itemsize
            raw = raw[: n * base.itemsize]
            if self.big_endian and base.itemsize > 1:
                if base.kind in "biufc":
                    arr = raw.view(base.newbyteorder(">")).astype(base.newbyteorder("<"))
                else:  # ml_dtypes 2-byte types (bf16): swap as uint16, reinterpret
                    arr = raw.view(">u2").astype("<u2").view(base)
            else:
                arr = raw.view(base)
            self.views[ck] = arr
        return arr, upcast

    def rebuild(self, storage, offset, size, stride, dtype_name: str | None, metadata=None):
        if not isinstance(storage, _Storage):
            raise self.fail(f"malformed tensor record: storage is {type(storage).__name__}")
        if dtype_name is None:
            dtype_name = storage.stype.dtype_name
            if dtype_name is None:
                raise self.fail("tensor on an untyped storage without a dtype")
        offset = _as_int(offset, "storage offset")
        size = _as_ints(size, "size")
        stride = _as_ints(stride, "stride")
        if len(size) != len(stride):
            raise self.fail(f"malformed tensor record: size {size} vs stride {stride}")
        if offset < 0 or any(s < 0 for s in size) or any(s < 0 for s in stride):
            raise self.fail(f"malformed tensor record: offset {offset} size {size} stride {stride}")
        neg = conj = False
        if isinstance(metadata, dict):
            neg, conj = bool(metadata.get("neg", False)), bool(metadata.get("conj", False))
        ck = (storage.key, dtype_name, offset, size, stride, neg, conj)
        ref = self.tensors.get(ck)
        if ref is not None:
            return ref
        elems, upcast = self.typed(storage, dtype_name)
        if 0 in size:
            out = np.zeros(size, dtype=np.float32 if upcast else elems.dtype)
        else:
            last = offset + sum((n - 1) * s for n, s in zip(size, stride))
            if last >= elems.size:
                raise self.fail(
                    f"storage record {storage.key!r} is too short for a tensor of size "
                    f"{list(size)} (needs element {last}, has {elems.size})"
                )
            isz = elems.dtype.itemsize
            view = np.lib.stride_tricks.as_strided(
                elems[offset:], shape=size, strides=tuple(s * isz for s in stride), writeable=False
            )
            out = np.array(view, order="C", copy=True)  # own, writable, contiguous
            # (in-place ufuncs below: a plain ufunc call would turn a 0-d array into a scalar)
            if upcast:
                wide = out.astype(np.uint32)
                np.left_shift(wide, 16, out=wide)
                out = wide.view(np.float32)
            elif out.dtype == np.bool_:
                out = out.view(np.uint8).astype(np.bool_)  # normalise any non-0/1 bytes
        if neg:
            np.negative(out, out=out)
        if conj and out.dtype.kind == "c":
            np.conjugate(out, out=out)
        ref = _TensorRef(out)
        self.tensors[ck] = ref
        return ref


# --------------------------------------------------------------------------- whitelisted globals

def _safe_size(*args):
    if len(args) != 1:
        raise ValueError("malformed torch.Size record")
    return _as_ints(args[0], "torch.Size")


def _safe_encode(obj, encoding="utf-8"):  # protocol-2 bytes: _codecs.encode(s, 'latin1')
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
        raise ValueError("malformed bytes record in data.pkl")
    return obj.encode(encoding)


def _safe_bytearray(*args):
    if len(args) > 1 or (args and not isinstance(args[0], (bytes, bytearray, list))):
        raise ValueError("malformed bytearray record in data.pkl")
    if args and isinstance(args[0], list) and not all(
        isinstance(v, int) and not isinstance(v, bool) for v in args[0]
    ):
        raise ValueError("malformed bytearray record in data.pkl")
    return bytearray(*args)


def _safe_complex(real=0.0, imag=0.0):
    if not all(isinstance(v, (int, float)) for v in (real, imag)):
        raise ValueError("malformed complex record in data.pkl")
    return complex(real, imag)


def _safe_set(*args):
    return set(*args)


def _safe_frozenset(*args):
    return frozenset(*args)


def _safe_ordered_dict(*args):
    if len(args) > 1:
        raise ValueError("malformed OrderedDict record in data.pkl")
    return OrderedDict(*args)


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, reader: _Reader):
        super().__init__(file, encoding="utf-8")
        self.reader = reader
        r = reader

        def _rebuild_tensor(storage, storage_offset, size, stride):
            return r.rebuild(storage, storage_offset, size, stride, None)

        def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                               backward_hooks=None, metadata=None):
            return r.rebuild(storage, storage_offset, size, stride, None, metadata)

        def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                               dtype, metadata=None):
            if not isinstance(dtype, TorchDtype):
                raise r.fail(f"malformed tensor record: dtype {dtype!r:.60}")
            return r.rebuild(storage, storage_offset, size, stride, dtype[len("torch."):], metadata)

        def _rebuild_parameter(data, requires_grad=True, backward_hooks=None):
            if not isinstance(data, _TensorRef):
                raise r.fail("malformed parameter record")
            return data

        def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
            return _rebuild_parameter(data)

        tensor_fns = (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3,
                      _rebuild_parameter, _rebuild_parameter_with_state)

        def _rebuild_from_type_v2(func, new_type, args, state):
            if func not in tensor_fns or new_type not in (_TENSOR, _PARAMETER):
                raise r.fail("malformed tensor-subclass record (only plain tensors are supported)")
            if not isinstance(args, tuple):
                raise r.fail("malformed tensor-subclass record")
            return func(*args)

        self.allowed: dict[tuple[str, str], Any] = {
            ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
            ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
            ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
            ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
            ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
            ("torch", "Tensor"): _TENSOR,
            ("torch.nn.parameter", "Parameter"): _PARAMETER,
            ("torch", "Size"): _safe_size,
            ("torch.storage", "UntypedStorage"): _StorageType("torch.storage.UntypedStorage", None),
            ("torch", "UntypedStorage"): _StorageType("torch.UntypedStorage", None),
            ("collections", "OrderedDict"): _safe_ordered_dict,
            ("builtins", "set"): _safe_set,
            ("builtins", "frozenset"): _safe_frozenset,
            ("builtins", "complex"): _safe_complex,
            ("builtins", "bytearray"): _safe_bytearray,
            ("_codecs", "encode"): _safe_encode,
        }

    def find_class(self, module: str, name: str):
        # protocol-2 pickles spell Python 3 names the Python 2 way (__builtin__.set, ...)
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        obj = self.allowed.get((module, name))
        if obj is not None:
            return obj
        if module == "torch" and name in _DTYPE_NAMES:
            return TorchDtype(f"torch.{name}")
        if module in ("torch", "torch.cuda") and name.endswith("Storage") and name.isidentifier():
            dn = _STORAGE_DTYPES.get(name)
            return _StorageType(f"{module}.{name}", dn, unknown=dn is None)
        raise UserError(
            f"refusing to load {self.reader.path!r}: it references {module}.{name}, "
            "which a weights-only checkpoint never needs",
            1,
        )

    def persistent_load(self, pid):
        return self.reader.load_storage(pid)


# --------------------------------------------------------------------------- tensor swap-out

def _swap_tensors(obj, memo: dict[int, Any]):
    """Replace every _TensorRef in nested dict/list/tuple containers by its ndarray."""
    if isinstance(obj, _TensorRef):
        return obj.array
    if isinstance(obj, (str, bytes, int, float, complex, type(None), set, frozenset, bytearray)):
        return obj
    oid = id(obj)
    if oid in memo:
        return memo[oid]
    if isinstance(obj, dict):
        memo[oid] = obj
        for k in list(obj.keys()):
            v = obj[k]
            nv = _swap_tensors(v, memo)
            if nv is not v:
                obj[k] = nv
        return obj
    if isinstance(obj, list):
        memo[oid] = obj
        for i, v in enumerate(obj):
            nv = _swap_tensors(v, memo)
            if nv is not v:
                obj[i] = nv
        return obj
    if isinstance(obj, tuple):
        items = [_swap_tensors(v, memo) for v in obj]
        out = obj if all(a is b for a, b in zip(items, obj)) else tuple(items)
        memo[oid] = out
        return out
    return obj


# --------------------------------------------------------------------------- entry point

def _open_zip(path: str) -> zipfile.ZipFile:
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path!r} does not exist", 1) from None
    except IsADirectoryError:
        raise UserError(f"checkpoint {path!r} is a directory, not a .pt file", 1) from None
    except OSError as e:
        raise UserError(f"cannot open checkpoint {path!r}: {e.strerror or e}", 1) from None
    if not head:
        raise UserError(f"cannot read {path!r}: the file is empty", 1)
    if head.startswith(_LEGACY_MAGIC):
        raise UserError(
            f"cannot read {path!r}: it is in PyTorch's legacy (pre-1.6, non-zip) serialization "
            "format; re-save it with torch.save under torch >= 1.6",
            1,
        )
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError) as e:
        if head.startswith(b"PK"):
            raise UserError(
                f"cannot read {path!r}: truncated or corrupt zip archive ({e})", 1
            ) from None
        raise UserError(
            f"cannot read {path!r}: not a torch.save checkpoint (not a zip archive)", 1
        ) from None


def read_pt(path) -> object:
    """Load a ``torch.save`` (zip format) checkpoint as plain Python + numpy, weights-only.

    Raises :class:`dba.errors.UserError` (code 1) with a one-line message on any problem:
    missing/empty/garbage/legacy/truncated file, missing ``data.pkl`` or storage record,
    storage too short, unknown dtype, or a pickle that references anything outside the
    weights-only whitelist (refused before it can run).
    """
    path = os.fspath(path)
    zf = _open_zip(path)
    with zf:
        try:
            names = zf.namelist()
        except Exception as e:  # pragma: no cover - namelist reads the already-parsed directory
            raise UserError(f"cannot read {path!r}: corrupt zip archive ({e})", 1) from None
        roots = sorted({n[: -len("/data.pkl")] for n in names
                        if n.endswith("/data.pkl") and n.count("/") == 1})
        if not roots:
            raise UserError(
                f"cannot read {path!r}: no <folder>/data.pkl in the zip, so it is not a "
                "torch.save checkpoint",
                1,
            )
        if len(roots) > 1:
            raise UserError(
                f"cannot read {path!r}: several top-level folders with data.pkl ({', '.join(roots)})",
                1,
            )
        root = roots[0]
        big_endian = False
        if f"{root}/byteorder" in names:
            try:
                order = zf.read(f"{root}/byteorder").decode("ascii", "replace").strip()
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as e:
                raise UserError(f"cannot read {path!r}: corrupt byteorder record ({e})", 1) from None
            if order not in ("little", "big"):
                raise UserError(f"cannot read {path!r}: unknown byteorder {order!r:.40}", 1)
            big_endian = order == "big"
        try:
            pkl = zf.read(f"{root}/data.pkl")
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as e:
            raise UserError(f"cannot read {path!r}: data.pkl is corrupt ({e})", 1) from None
        reader = _Reader(path, zf, root, big_endian)
        try:
            payload = _Unpickler(io.BytesIO(pkl), reader).load()
            return _swap_tensors(payload, {})
        except UserError:
            raise
        except MemoryError:
            raise UserError(f"cannot read {path!r}: out of memory while rebuilding tensors", 1) from None
        except RecursionError:
            raise UserError(f"cannot read {path!r}: data.pkl is nested too deeply", 1) from None
        except Exception as e:
            msg = " ".join(str(e).split())[:200]
            raise UserError(
                f"cannot read {path!r}: malformed data.pkl ({type(e).__name__}: {msg})", 1
            ) from None
