"""The prepared-case cache: one entry per (source files, preprocessing settings), shared by runs and studies,
written atomically, stored without its zero voxels and read back bit for bit."""
import dataclasses
import io
import multiprocessing
import os
import shutil
import types

import numpy as np
import pytest
from tqdm import tqdm

from helpers import sample_case, smoke_config, tiny_manifest
from prepare_race import prepare_together
from transfer_jax.data import preprocess
from transfer_jax.data.dataset import prepare_splits, prepared_cache_dir, preprocess_config
from transfer_jax.data.manifest import read_manifest
from transfer_jax.data.preprocess import (PreparedCase, PreprocessConfig, cache_key, pack_nonzero, prepare_case,
                                          preprocess_cases, preprocess_workers, unpack_nonzero)
from transfer_jax.train.writer import MetricWriter

SMALL = PreprocessConfig(spacing=(3.0, 2.0, 2.0), crop_size=(8, 32, 32))
NO_CHECK = types.SimpleNamespace(validate_case=lambda case, prepared: None)


@pytest.fixture
def counted(monkeypatch):
    """The ids of the cases `preprocess_cases` prepares in this process."""
    calls = []
    real = preprocess.prepare_case
    monkeypatch.setattr(preprocess, "prepare_case", lambda case, config: calls.append(case.case_id) or
                        real(case, config))
    return calls


def _copied_sample(sample_dir, directory):
    shutil.copytree(sample_dir, directory)
    return sample_case(str(directory))


def test_stored_arrays_come_back_bit_for_bit(sample_dir, tmp_path):
    prepared = prepare_case(sample_case(sample_dir), SMALL)
    prepared.image[0, 0, 0] = [-0.0, np.nan, np.inf]  # zero bits decide what is left out, not the value
    path = str(tmp_path / "case.npz")
    prepared.save(path)
    loaded = PreparedCase.load(path)
    for name in ("image", "gland", "lesion"):
        stored, back = getattr(prepared, name), getattr(loaded, name)
        assert back.dtype == stored.dtype and back.flags.writeable
        np.testing.assert_array_equal(back.view(f"u{back.itemsize}"), stored.view(f"u{stored.itemsize}"))
    assert (loaded.case_id, loaded.label) == (prepared.case_id, prepared.label)
    np.testing.assert_array_equal(loaded.region_grid.affine, prepared.region_grid.affine)
    assert loaded.source_grid.shape == prepared.source_grid.shape
    assert os.listdir(tmp_path) == ["case.npz"]  # no temporary file left behind
    dataclasses.replace(prepared, gland=None, lesion=None).save(path)  # a case without masks
    loaded = PreparedCase.load(path)
    assert loaded.gland is None and loaded.lesion is None and loaded.image.shape == prepared.image.shape


def test_zero_voxels_cost_one_bit():
    array = np.zeros((4, 8, 8, 3), np.float32)
    array[1, 2:5, 3:6] = np.random.default_rng(0).normal(size=(3, 3, 3))
    bits, values = pack_nonzero(array)
    assert bits.nbytes == array.size // 8 and values.size == 27
    np.testing.assert_array_equal(unpack_nonzero(bits, values, array.shape), array)


def test_a_changed_setting_or_source_file_makes_a_new_entry(sample_dir, tmp_path, counted):
    case = _copied_sample(sample_dir, tmp_path / "data")
    cache = str(tmp_path / "cache")
    first = preprocess_cases([case], SMALL, cache).paths[case.case_id]
    assert preprocess_cases([case], SMALL, cache).paths[case.case_id] == first and counted == [case.case_id]

    other = dataclasses.replace(SMALL, region_margin=1.5)
    assert cache_key(case, other) != cache_key(case, SMALL)
    assert preprocess_cases([case], other, cache).paths[case.case_id] != first and len(counted) == 2

    # the same bytes at another time, then other bytes of the same size at the same time
    stat = os.stat(case.dwi)
    key = cache_key(case, SMALL)
    os.utime(case.dwi, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))
    assert cache_key(case, SMALL) != key
    with open(case.dwi, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(case.dwi, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))
    moved = cache_key(case, SMALL)
    assert moved not in (key, cache_key(case, other))
    assert len(os.listdir(cache)) == 2


@pytest.mark.slow
def test_two_processes_preparing_at_once_leave_one_valid_entry(tmp_path):
    cases = read_manifest(tiny_manifest(str(tmp_path / "data"), num_cases=4))
    cache = str(tmp_path / "cache")
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    processes = [context.Process(target=prepare_together, args=(barrier, results, cases, SMALL, cache))
                 for _ in range(2)]
    for process in processes:
        process.start()
    (prepared_a, first), (prepared_b, second) = results.get(timeout=120), results.get(timeout=120)
    for process in processes:
        process.join(timeout=60)
    assert prepared_a == prepared_b == len(cases)  # both found the cache empty and wrote every entry
    assert first == second and len(first) == len(cases)
    assert sorted(os.path.join(cache, n) for n in os.listdir(cache)) == first  # no partial files either
    by_id = {case.case_id: case for case in cases}
    for path in first:
        loaded = PreparedCase.load(path)
        np.testing.assert_array_equal(loaded.image, prepare_case(by_id[loaded.case_id], SMALL).image)


@pytest.mark.slow
def test_worker_processes_prepare_what_the_main_process_would(tmp_path, capsys):
    cases = read_manifest(tiny_manifest(str(tmp_path / "data"), num_cases=3))
    serial = preprocess_cases(cases, SMALL, str(tmp_path / "serial"), workers=0)
    pooled = preprocess_cases(cases, SMALL, str(tmp_path / "pooled"), workers=2, progress=True)
    assert pooled.prepared == len(cases) and list(pooled.paths) == list(serial.paths)
    for case_id, path in serial.paths.items():
        np.testing.assert_array_equal(PreparedCase.load(pooled.paths[case_id]).image, PreparedCase.load(path).image)
    bar = capsys.readouterr().err
    assert "prepare" in bar and f"{len(cases)}/{len(cases)}" in bar


def test_preprocess_workers():
    assert preprocess_workers(0) == preprocess_workers(1) == 1 and preprocess_workers(3) == 3
    cores = len(os.sched_getaffinity(0))
    assert preprocess_workers(-1) == max(1, min(preprocess.MAX_AUTO_WORKERS, cores - 1))
    for bad in (-2, 1.5, True, "4"):
        with pytest.raises(ValueError, match="config.data.preprocess_workers must be -1"):
            preprocess_workers(bad)


def test_default_cache_is_the_users_unless_moved(monkeypatch, tmp_path):
    config = smoke_config()
    monkeypatch.delenv(preprocess.CACHE_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert prepared_cache_dir(config.data) == str(tmp_path / "xdg" / "transfer_jax" / "prepared")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert prepared_cache_dir(config.data) == str(tmp_path / "home" / ".cache" / "transfer_jax" / "prepared")
    monkeypatch.setenv(preprocess.CACHE_DIR_ENV, str(tmp_path / "env"))
    assert prepared_cache_dir(config.data) == str(tmp_path / "env")
    config.data.cache_dir = str(tmp_path / "mine")
    assert prepared_cache_dir(config.data) == str(tmp_path / "mine")


def test_a_study_prepares_each_case_once(tmp_path, monkeypatch, counted):
    """Every run the study plans (pretraining included) prepares its data into the shared cache as the trainer's
    set-up does: each case once per distinct preprocessing, nothing the second time."""
    from helpers import load_config
    from transfer_jax.study import runner

    monkeypatch.setenv(preprocess.CACHE_DIR_ENV, str(tmp_path / "cache"))
    study = load_config("study", "smoke")
    pretraining, plan = runner.plan_study(runner.parse_study(study), str(tmp_path / "study"))
    configs = [p.config for p in pretraining.values()] + [r.config for r in plan if r.config is not None]
    assert len(configs) > 20
    distinct = {}
    for _ in range(2):
        for config in configs:
            config.data.preprocess_workers = 0  # in this process, where the preparations are counted
            splits = prepare_splits(config.data, prepared_cache_dir(config.data), NO_CHECK, log=lambda _: None)
            distinct[(splits.manifest, preprocess_config(config.data))] = len(read_manifest(splits.manifest))
    assert 1 < len(distinct) < len(configs)
    assert len(counted) == sum(distinct.values()) == len(os.listdir(tmp_path / "cache"))


def test_log_lines_go_to_log_txt_and_above_the_progress_bar(tmp_path):
    stream = io.StringIO()
    writer = MetricWriter(str(tmp_path), tensorboard=False, stream=stream)
    with tqdm(total=10, desc="train", file=stream) as bar:
        bar.update(3)
        writer.write(3, {"loss": 0.5}, prefix="train/")
        writer.log("hint: something")
    writer.close()
    out = stream.getvalue()
    assert "\rstep 3: train/loss=0.5\n" in out and "\rhint: something\n" in out  # the bar was cleared first
    assert "3/10" in out.split("hint: something\n", 1)[1]  # and drawn again below the lines
    logged = open(tmp_path / "log.txt", encoding="utf-8").read().splitlines()
    assert [line.split(" ", 2)[2] for line in logged] == ["step 3: train/loss=0.5", "hint: something"]


@pytest.mark.slow
def test_two_runs_share_one_prepared_copy(tmp_path):
    from transfer_jax.train.loop import train_and_evaluate

    overrides = {"data.cache_dir": str(tmp_path / "cache"), "total_steps": 1, "eval_every": 1, "log_every": 1,
                 "checkpoint_every": 1, "logging.tensorboard": False, "alignment.enabled": False}
    for name in ("a", "b"):
        train_and_evaluate(smoke_config(**overrides), str(tmp_path / name))
    cases = len(os.listdir(tmp_path / "cache"))
    assert cases == 6  # the smoke phantom cohort
    first = open(tmp_path / "a" / "log.txt", encoding="utf-8").read()
    second = open(tmp_path / "b" / "log.txt", encoding="utf-8").read()
    assert "0 from the cache, 6 prepared now" in first and "done:" in first
    assert "6 from the cache, 0 prepared now" in second
