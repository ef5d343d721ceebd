"""Read PyTorch checkpoints (`.pth`, `.pth.tar`, `.pt`) and `.safetensors` files without importing torch.

Public API (shared by every converter in `transfer_jax.convert`):

* `load_torch_checkpoint(path)` -> the unpickled top-level object (usually a dict) with every tensor turned into a
  `numpy.ndarray`.
* `load_state_dict(path)` -> `dict[str, np.ndarray]`: the flat parameter dict, unwrapped from a `model` /
  `state_dict` top-level key when the file is a training checkpoint (`extract_state_dict(obj)` does the same for
  an object already returned by `load_torch_checkpoint`, so other top-level entries such as `args` or `epoch`
  can be read without loading the file twice).
* `CheckpointReadError` (a `ValueError`) for unreadable files, `UnsafeCheckpointError` for pickles that reference
  anything outside the allow-list below. Both messages name the file.

What the torch zip format holds (`torch.save` since torch 1.6): a zip archive with one top folder (`archive/` or the
file stem) containing `data.pkl` (the pickled object tree), `data/<key>` (one raw little-endian byte buffer per
storage), `byteorder` (`little`/`big`, absent in old files = little) and `version`. Inside `data.pkl`, tensors are
`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` calls and storages are *persistent ids*
`('storage', <torch.FloatStorage class>, key, location, numel)`.

Safety: `pickle` runs whatever callable a file names. The unpickler here resolves only an explicit allow-list of
globals (containers, `argparse.Namespace`, the tensor/storage rebuild functions, numpy scalars/arrays, `torch.Size`)
to local stand-ins, so a hostile file cannot run code; anything else raises `UnsafeCheckpointError`. torch is never
imported, whether installed or not.

Tensors come back as numpy arrays with their own memory (storage offsets and strides are resolved, then copied).
bfloat16 has no numpy dtype: it is widened to float32 exactly (the 16 stored bits are the high half of a float32).
"""
from __future__ import annotations

import _compat_pickle
import argparse
import collections
import io
import json
import os
import pickle
import struct
import zipfile
from typing import Any

import numpy as np

__all__ = [
    "CheckpointReadError",
    "UnsafeCheckpointError",
    "load_torch_checkpoint",
    "load_state_dict",
    "extract_state_dict",
    "STATE_DICT_KEYS",
]

# Top-level keys under which training scripts nest the parameter dict (ProFound/MAE use `model`).
STATE_DICT_KEYS = ("model", "state_dict")


class CheckpointReadError(ValueError):
    """The file is missing, truncated, corrupt, or not a checkpoint this reader understands."""

    def __init__(self, path: str | os.PathLike, message: str):
        self.path = os.fspath(path)
        self.detail = message
        super().__init__(f"{self.path}: {message}")


class UnsafeCheckpointError(CheckpointReadError):
    """The pickle references a global outside the allow-list (it could execute code when unpickled)."""

    def __init__(self, path: str | os.PathLike, module: str, name: str):
        self.module = module
        self.name = name
        super().__init__(
            path,
            f"refusing to unpickle global '{module}.{name}': only plain containers, argparse.Namespace, numpy "
            "scalars/arrays and torch tensor/storage records are allowed (the file may try to run code)",
        )


# --------------------------------------------------------------------------------------------------------------
# Storage and tensor reconstruction


class _StorageType:
    """Stand-in for a `torch.<Name>Storage` class: only carries the element dtype."""

    def __init__(self, name: str, dtype: str):
        self.name = name
        self.dtype = dtype  # numpy dtype string, or "bfloat16"

    def __repr__(self) -> str:
        return f"torch.{self.name}"


# Element type of every legacy typed-storage class name torch writes into persistent ids.
_STORAGE_DTYPES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    # An untyped storage is a byte buffer (written when a raw `UntypedStorage` is saved).
    "UntypedStorage": "uint8",
}


class _Storage:
    """A flat numpy view of one storage buffer, in its element dtype (bfloat16 already widened to float32)."""

    def __init__(self, array: np.ndarray, dtype_name: str):
        self.array = array
        self.dtype_name = dtype_name


def _decode_buffer(raw: bytes, dtype_name: str, byteorder: str) -> np.ndarray:
    endian = "<" if byteorder == "little" else ">"
    if dtype_name == "bfloat16":
        bits = np.frombuffer(raw, dtype=f"{endian}u2").astype(np.uint32)
        return (bits << 16).view(np.float32)
    dtype = np.dtype(dtype_name)
    if dtype.itemsize > 1:
        dtype = dtype.newbyteorder(endian)
    array = np.frombuffer(raw, dtype=dtype)
    return array.astype(array.dtype.newbyteorder("="), copy=False) if dtype.itemsize > 1 else array


def _rebuild_array(path: str, storage: Any, offset: int, size, stride) -> np.ndarray:
    if not isinstance(storage, _Storage):
        raise CheckpointReadError(path, f"tensor record refers to {type(storage).__name__}, not a storage")
    size = tuple(int(s) for s in size)
    stride = tuple(int(s) for s in stride)
    flat = storage.array
    if len(size) != len(stride):
        raise CheckpointReadError(path, f"tensor record has size {size} but stride {stride}")
    if any(s == 0 for s in size):
        return np.zeros(size, dtype=flat.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if offset < 0 or last >= flat.size or any(s < 0 for s in stride):
        raise CheckpointReadError(
            path,
            f"tensor of size {size}, stride {stride}, offset {offset} reaches element {last} of a storage with "
            f"{flat.size} elements (truncated or corrupt data)",
        )
    view = np.lib.stride_tricks.as_strided(
        flat[offset:], shape=size, strides=tuple(s * flat.itemsize for s in stride), writeable=False
    )
    return np.array(view, copy=True)


# --------------------------------------------------------------------------------------------------------------
# The restricted unpickler


def _torch_size(values=()):
    return tuple(int(v) for v in values)


def _codecs_encode(text: str, encoding: str = "utf-8"):
    # Protocol-2 pickles store `bytes` as `_codecs.encode(latin-1 text, 'latin1')`; pure data, no side effects.
    return text.encode(encoding)


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only allow-listed globals; storages come from the zip archive through `persistent_load`."""

    def __init__(self, file, *, path: str, load_storage):
        super().__init__(file)
        self._path = path
        self._load_storage = load_storage
        self._storages: dict[str, _Storage] = {}

    # Rebuild functions receive the unpickled arguments; they produce numpy arrays.
    def _rebuild_tensor_v2(self, storage, storage_offset, size, stride, requires_grad=False,
                           backward_hooks=None, metadata=None):
        return _rebuild_array(self._path, storage, int(storage_offset), size, stride)

    def _rebuild_tensor(self, storage, storage_offset, size, stride):
        return _rebuild_array(self._path, storage, int(storage_offset), size, stride)

    def _rebuild_parameter(self, data, requires_grad=False, backward_hooks=None):
        return data

    def _rebuild_parameter_with_state(self, data, requires_grad, backward_hooks, state):
        return data

    def _rebuild_from_type_v2(self, func, new_type, args, state):
        # Tensor subclasses (incl. Parameter) pickle as (rebuild fn, type, args, python state); keep the array.
        return func(*args)

    def find_class(self, module: str, name: str):
        # Protocol-2 pickles use Python 2 names (`__builtin__.set`); map them as the stock unpickler does.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        key = (module, name)
        if key in _PLAIN_GLOBALS:
            return _PLAIN_GLOBALS[key]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name, _STORAGE_DTYPES[name])
        if module == "torch.storage" and name in ("UntypedStorage", "TypedStorage"):
            return _StorageType(name, "uint8")
        if module == "torch._utils" and name in (
            "_rebuild_tensor_v2", "_rebuild_tensor", "_rebuild_parameter", "_rebuild_parameter_with_state",
        ):
            return getattr(self, name)
        if module == "torch._tensor" and name == "_rebuild_from_type_v2":
            return self._rebuild_from_type_v2
        if (module, name) in (("torch", "Tensor"), ("torch.nn.parameter", "Parameter"), ("torch", "device")):
            # Only ever used as a type tag (or a device name string); a harmless marker object is enough.
            return _Marker(f"{module}.{name}")
        raise UnsafeCheckpointError(self._path, module, name)

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"):
            raise CheckpointReadError(self._path, f"unexpected persistent id {pid!r} (not a torch storage record)")
        storage_type, key = pid[1], str(pid[2])
        if not isinstance(storage_type, _StorageType):
            raise CheckpointReadError(self._path, f"storage record {key!r} has unknown type {storage_type!r}")
        if key not in self._storages:
            self._storages[key] = _Storage(self._load_storage(key, storage_type.dtype), storage_type.dtype)
        storage = self._storages[key]
        if storage.dtype_name != storage_type.dtype:
            raise CheckpointReadError(
                self._path, f"storage {key!r} is read both as {storage.dtype_name} and {storage_type.dtype}"
            )
        return storage


class _Marker:
    """Placeholder for an allow-listed torch type used only as a tag; calling it returns its first argument."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, *args, **kwargs):
        return args[0] if args else None

    def __repr__(self) -> str:
        return f"<{self.name}>"


def _numpy_scalar(dtype, data=None):
    # numpy's own pickle record for a scalar: (dtype, raw bytes).
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _numpy_reconstruct(cls, shape, dtype_code):
    # numpy arrays unpickle as `_reconstruct(ndarray, (0,), b'b')` followed by `__setstate__` with the data.
    return np.ndarray.__new__(np.ndarray, shape, np.dtype(dtype_code))


# Globals that map to themselves or to a safe local equivalent.
_PLAIN_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "defaultdict"): collections.defaultdict,
    ("collections", "Counter"): collections.Counter,
    ("builtins", "dict"): dict,
    ("builtins", "list"): list,
    ("builtins", "tuple"): tuple,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "int"): int,
    ("builtins", "float"): float,
    ("builtins", "complex"): complex,
    ("builtins", "bool"): bool,
    ("builtins", "str"): str,
    ("builtins", "bytes"): bytes,
    ("builtins", "bytearray"): bytearray,
    ("builtins", "slice"): slice,
    ("_codecs", "encode"): _codecs_encode,
    ("argparse", "Namespace"): argparse.Namespace,
    ("torch", "Size"): _torch_size,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


# --------------------------------------------------------------------------------------------------------------
# File formats


def _load_torch_zip(path: str) -> Any:
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise CheckpointReadError(path, f"not a readable torch zip checkpoint ({exc}); truncated or corrupt?") from exc
    with archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise CheckpointReadError(
                path, f"expected exactly one '<folder>/data.pkl' in the zip archive, found {pickles or 'none'}"
            )
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = "little"
        if prefix + "byteorder" in names:
            byteorder = archive.read(prefix + "byteorder").decode("ascii", "replace").strip()
            if byteorder not in ("little", "big"):
                raise CheckpointReadError(path, f"unknown byteorder record {byteorder!r}")

        def load_storage(key: str, dtype_name: str) -> np.ndarray:
            member = f"{prefix}data/{key}"
            try:
                raw = archive.read(member)
            except KeyError as exc:
                raise CheckpointReadError(path, f"storage {member!r} is missing from the archive") from exc
            item = 2 if dtype_name == "bfloat16" else np.dtype(dtype_name).itemsize
            if len(raw) % item:
                raise CheckpointReadError(
                    path, f"storage {member!r} has {len(raw)} bytes, not a multiple of the {dtype_name} size {item}"
                )
            return _decode_buffer(raw, dtype_name, byteorder)

        try:
            data = archive.read(pickles[0])
            unpickler = _RestrictedUnpickler(io.BytesIO(data), path=path, load_storage=load_storage)
            return unpickler.load()
        except CheckpointReadError:
            raise
        except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError, ValueError, TypeError, IndexError,
                KeyError, AttributeError, struct.error, OSError) as exc:
            # zlib/CRC failures surface as BadZipFile or OSError; malformed pickles as the others.
            raise CheckpointReadError(path, f"corrupt checkpoint ({type(exc).__name__}: {exc})") from exc


_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
    # The header is validated here (so a truncated file gets a message naming it); the tensors are then read by
    # `safetensors.numpy`, except bfloat16 which numpy cannot represent and is widened from the raw bytes.
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise CheckpointReadError(path, "truncated safetensors file (no header length)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise CheckpointReadError(path, f"truncated safetensors file (header of {header_len} bytes, file {size})")
        try:
            header = json.loads(handle.read(header_len))
        except ValueError as exc:
            raise CheckpointReadError(path, f"corrupt safetensors header ({exc})") from exc
        payload_size = size - 8 - header_len
        entries = {k: v for k, v in header.items() if k != "__metadata__"}
        for name, entry in entries.items():
            start, stop = entry["data_offsets"]
            if stop > payload_size:
                raise CheckpointReadError(
                    path, f"truncated safetensors file: tensor {name!r} ends at byte {stop} of a {payload_size}-byte "
                    "payload"
                )
            if entry["dtype"] not in _SAFETENSORS_DTYPES:
                raise CheckpointReadError(path, f"tensor {name!r} has unsupported dtype {entry['dtype']}")
        if not any(entry["dtype"] == "BF16" for entry in entries.values()):
            import safetensors.numpy

            return dict(safetensors.numpy.load_file(path))
        out = {}
        base = 8 + header_len
        for name, entry in entries.items():
            start, stop = entry["data_offsets"]
            handle.seek(base + start)
            flat = _decode_buffer(handle.read(stop - start), _SAFETENSORS_DTYPES[entry["dtype"]], "little")
            out[name] = np.array(flat.reshape(entry["shape"]), copy=True)
        return out


def load_torch_checkpoint(path: str | os.PathLike) -> Any:
    """Unpickle a torch checkpoint (or read a `.safetensors` file) into plain Python + numpy, without torch.

    Returns the saved object: typically a dict such as `{'model': OrderedDict[str, ndarray], 'args': Namespace,
    'epoch': 3}`, or the state dict itself. Raises `CheckpointReadError` naming the file when it is missing,
    truncated, corrupt or in the pre-1.6 legacy (non-zip) format, and `UnsafeCheckpointError` when the pickle
    names a global outside the allow-list.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointReadError(path, "no such checkpoint file")
    if path.endswith(".safetensors"):
        return _load_safetensors(path)
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic[:2] == b"PK":
        return _load_torch_zip(path)
    if magic[:1] == b"\x80":
        raise CheckpointReadError(
            path, "legacy (pre torch 1.6, non-zip) serialization is not supported; re-save it with a current torch"
        )
    raise CheckpointReadError(path, "not a torch zip checkpoint or safetensors file (unrecognised header)")


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The flat `{parameter name: array}` dict of a checkpoint.

    If the top-level object holds one of `STATE_DICT_KEYS` (`model`, then `state_dict`) that entry is used, so
    upstream training checkpoints (`{'model': ..., 'optimizer': ..., 'args': ...}`) and bare state dicts both
    work. Every value must be an array; anything else is reported with its key.
    """
    path = os.fspath(path)
    return extract_state_dict(load_torch_checkpoint(path), path)


def extract_state_dict(obj: Any, path: str | os.PathLike = "<checkpoint>") -> dict[str, np.ndarray]:
    """`load_state_dict` on an already loaded checkpoint object (`path` only names it in errors)."""
    path = os.fspath(path)
    if not isinstance(obj, dict):
        raise CheckpointReadError(path, f"top-level object is a {type(obj).__name__}, not a dict")
    for key in STATE_DICT_KEYS:
        if key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    bad = [f"{k!r} ({type(v).__name__})" for k, v in obj.items() if not isinstance(k, str) or
           not isinstance(v, np.ndarray)]
    if bad:
        raise CheckpointReadError(
            path, f"not a flat state dict: entries that are not named arrays: {', '.join(bad[:10])}"
            + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        )
    return dict(obj)
