"""The torch-free checkpoint reader: dtypes, views, safety, corrupt files, safetensors."""
import functools
import json
import os
import pickle
import struct
import sys
import zipfile

import numpy as np
import pytest

from helpers import fixture_path
from transfer_jax.convert.torch_pickle import (
    CheckpointReadError,
    UnsafeCheckpointError,
    load_state_dict,
    load_torch_checkpoint,
)

fixture = functools.partial(fixture_path, "profound")


def test_every_dtype_and_view_matches_torch():
    loaded = load_torch_checkpoint(fixture("reader_dtypes.pth"))
    expected = np.load(fixture("reader_dtypes_ref.npz"))
    assert loaded["epoch"] == 11 and loaded["note"] == "dtypes"
    tensors = loaded["state_dict"]
    assert sorted(tensors) == sorted(expected.files)
    for name in expected.files:
        np.testing.assert_array_equal(tensors[name], expected[name], err_msg=name)
        assert tensors[name].shape == expected[name].shape, name
    assert tensors["float16"].dtype == np.float16
    assert tensors["bfloat16"].dtype == np.float32  # widened exactly
    assert tensors["int64"].dtype == np.int64 and tensors["bool"].dtype == np.bool_
    assert tensors["uint8"].dtype == np.uint8 and tensors["int32"].dtype == np.int32
    # Views over one storage come back as independent arrays.
    assert not np.shares_memory(tensors["float32"], tensors["transposed"])
    tensors["float32"][0, 0] = 1e9
    assert tensors["transposed"][0, 0] != 1e9


def test_training_checkpoint_with_namespace_numpy_scalars_and_optimizer():
    ckpt = load_torch_checkpoint(fixture("conv_fcmae.pth"))
    assert ckpt["epoch"] == 799
    assert ckpt["args"].mask_ratio == 0.6 and tuple(ckpt["args"].input_size) == (16, 32, 32)
    assert ckpt["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)
    assert float(ckpt["optimizer"]["state"][0]["step"]) == 10.0
    classifier = load_torch_checkpoint(fixture("conv_classifier.pth.tar"))
    assert classifier["args"].layer_decay == pytest.approx(0.6)
    assert isinstance(classifier["args"].layer_decay, np.floating)


def test_load_state_dict_unwraps_model_key_and_accepts_bare_dicts():
    wrapped = load_state_dict(fixture("conv_fcmae.pth"))
    assert "encoder.downsample_layers.0.0.weight" in wrapped and "args" not in wrapped
    bare = load_state_dict(fixture("vit_upernet.pth"))
    assert "encoder.cls_token" in bare
    dtypes = load_state_dict(fixture("reader_dtypes.pth"))  # under 'state_dict'
    assert "bfloat16" in dtypes


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def _torch_like_zip(path, payload: bytes, storages=None):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", payload)
        archive.writestr("archive/byteorder", "little")
        for key, raw in (storages or {}).items():
            archive.writestr(f"archive/data/{key}", raw)


def test_code_running_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    _torch_like_zip(path, pickle.dumps({"model": _RunsCode()}, protocol=2))
    with pytest.raises(UnsafeCheckpointError) as info:
        load_torch_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "system" in message
    assert info.value.name == "system" and info.value.module in ("posix", "os", "nt")


def test_builtins_eval_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (eval, ("1 + 1",))

    path = tmp_path / "eval.pth"
    _torch_like_zip(path, pickle.dumps(Evil(), protocol=2))
    with pytest.raises(UnsafeCheckpointError, match=r"builtins\.eval"):
        load_torch_checkpoint(path)


def test_truncated_file_names_the_file(tmp_path):
    data = open(fixture("conv_classifier.pth.tar"), "rb").read()
    path = tmp_path / "truncated.pth.tar"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointReadError) as info:
        load_torch_checkpoint(path)
    assert str(path) in str(info.value)


def test_corrupt_storage_is_reported(tmp_path):
    # A storage shorter than the tensor that views it.
    source = zipfile.ZipFile(fixture("reader_dtypes.pth"))
    path = tmp_path / "short_storage.pth"
    with zipfile.ZipFile(path, "w") as out:
        for name in source.namelist():
            raw = source.read(name)
            if "/data/" in name and "serialization_id" not in name and len(raw) >= 8:
                raw = raw[:4]
            out.writestr(name, raw)
    with pytest.raises(CheckpointReadError, match="short_storage.pth"):
        load_torch_checkpoint(path)


def test_missing_and_unrecognised_files(tmp_path):
    with pytest.raises(CheckpointReadError, match="no such checkpoint file"):
        load_torch_checkpoint(tmp_path / "absent.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"hello world")
    with pytest.raises(CheckpointReadError, match="junk.pth"):
        load_torch_checkpoint(junk)
    legacy = tmp_path / "legacy.pth"
    legacy.write_bytes(pickle.dumps(1, protocol=2))
    with pytest.raises(CheckpointReadError, match="legacy"):
        load_torch_checkpoint(legacy)


def test_state_dict_with_non_array_entries_is_rejected(tmp_path):
    path = tmp_path / "odd.pth"
    _torch_like_zip(path, pickle.dumps({"model": {"w": 3}}, protocol=2))
    with pytest.raises(CheckpointReadError, match="'w'"):
        load_state_dict(path)


def test_safetensors_round_trip(tmp_path):
    import safetensors.numpy

    arrays = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.array([1, -2], dtype=np.int64),
              "c": np.ones((2, 2), np.float16)}
    path = tmp_path / "weights.safetensors"
    safetensors.numpy.save_file(arrays, str(path))
    loaded = load_state_dict(path)
    assert sorted(loaded) == ["a", "b", "c"]
    for k, v in arrays.items():
        np.testing.assert_array_equal(loaded[k], v)
        assert loaded[k].dtype == v.dtype


def _write_bf16_safetensors(path, values: np.ndarray):
    bits = (values.astype(np.float32).view(np.uint32) >> 16).astype("<u2")
    header = json.dumps({"w": {"dtype": "BF16", "shape": list(values.shape), "data_offsets": [0, bits.nbytes]}})
    header = header.encode() + b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + bits.tobytes())


def test_safetensors_bfloat16_is_widened_exactly(tmp_path):
    # Values exactly representable in bfloat16 (8 significant bits) survive the round trip unchanged.
    values = np.array([[1.0, -2.5, 0.15625], [3.0e38, -1.0e-38, 0.0]], dtype=np.float32)
    values = ((values.view(np.uint32) >> 16) << 16).view(np.float32)
    path = tmp_path / "bf16.safetensors"
    _write_bf16_safetensors(path, values)
    loaded = load_state_dict(path)
    assert loaded["w"].dtype == np.float32
    np.testing.assert_array_equal(loaded["w"], values)


def test_truncated_safetensors_names_the_file(tmp_path):
    import safetensors.numpy

    path = tmp_path / "cut.safetensors"
    safetensors.numpy.save_file({"a": np.zeros(100, np.float32)}, str(path))
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(CheckpointReadError, match="cut.safetensors.*truncated"):
        load_state_dict(path)


def test_reader_never_imports_torch():
    assert "torch" not in sys.modules
