"""The `python -m transfer_jax.alignment` command, run as a subprocess."""
from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from helpers import run_python


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return run_python("-m", "transfer_jax.alignment", *args, timeout=120)


def last_json(process: subprocess.CompletedProcess) -> dict:
    assert process.returncode == 0, process.stderr
    return json.loads(process.stdout.strip().splitlines()[-1])


def gram(a, b, sigmas):
    d2 = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    return sum(np.exp(-d2 / (2 * s * s)) for s in sigmas)


def ref_mmd2(x, y, sigmas):
    m, n = len(x), len(y)
    kxx, kyy, kxy = gram(x, x, sigmas), gram(y, y, sigmas), gram(x, y, sigmas)
    unbiased = (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    unbiased -= 2 * kxy.mean()
    biased = kxx.mean() + kyy.mean() - 2 * kxy.mean()
    return unbiased, biased


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    folder = tmp_path_factory.mktemp("features")
    rng = np.random.default_rng(0)
    arrays = {
        "x": rng.normal(size=(60, 8)).astype(np.float32),
        "y_shifted": (rng.normal(size=(60, 8)) + 0.8).astype(np.float32),
        "y_short": rng.normal(size=(45, 8)).astype(np.float64),
        "wrong_dim": rng.normal(size=(60, 5)).astype(np.float32),
        "three_d": rng.normal(size=(6, 4, 2)).astype(np.float32),
        "integers": rng.integers(0, 5, size=(60, 8)),
    }
    with_nan = arrays["x"].copy()
    with_nan[7, 3] = np.nan
    arrays["with_nan"] = with_nan
    paths = {}
    for name, array in arrays.items():
        paths[name] = str(folder / f"{name}.npy")
        np.save(paths[name], array)
    paths["not_npy"] = str(folder / "not_npy.npy")
    with open(paths["not_npy"], "w") as handle:
        handle.write("hello")
    return paths


def test_default_is_unbiased_gaussian_median(features):
    out = last_json(run_cli(features["x"], features["y_short"]))
    x, y = np.load(features["x"]).astype(np.float64), np.load(features["y_short"])
    pooled = np.concatenate([x, y])
    distances = np.sqrt(((pooled[:, None] - pooled[None]) ** 2).sum(-1))
    sigma = np.median(distances[np.triu_indices(len(pooled), 1)])
    assert out["estimator"] == "unbiased" and out["kernel"] == "gaussian" and out["bandwidth_rule"] == "median"
    assert (out["n_x"], out["n_y"], out["dim"]) == (60, 45, 8)
    assert out["bandwidths"] == pytest.approx([sigma], rel=1e-5)
    assert out["mmd2"] == pytest.approx(ref_mmd2(x, y, [sigma])[0], abs=1e-6)
    assert "p_value" not in out and "cka" not in out


def test_permutation_and_sign_flip_tests_and_cka(features):
    out = last_json(run_cli(features["x"], features["y_shifted"], "--permutations", "99", "--cka", "--seed", "3"))
    assert out["test"] == "permutation" and out["permutations"] == 99
    assert out["p_value"] == pytest.approx(0.01)  # a clear mean shift: no permutation reaches the observed value
    assert 0.0 <= out["cka"] <= 1.0
    flipped = last_json(run_cli(features["x"], features["y_shifted"], "--permutations", "99", "--test", "sign-flip"))
    assert flipped["test"] == "sign_flip" and flipped["p_value"] == pytest.approx(0.01)
    assert flipped["mmd2"] == pytest.approx(out["mmd2"], rel=1e-6)


def test_other_estimators_with_fixed_bandwidths(features):
    x, y = np.load(features["x"]).astype(np.float64), np.load(features["y_short"])
    biased = last_json(
        run_cli(features["x"], features["y_short"], "--estimator", "biased", "--bandwidth", "1,3", "--x64")
    )
    assert biased["bandwidths"] == [1.0, 3.0] and biased["dtype"] == "float64"
    assert biased["mmd2"] == pytest.approx(ref_mmd2(x, y, [1.0, 3.0])[1], abs=1e-10)

    y_shifted = np.load(features["y_shifted"]).astype(np.float64)
    linear = last_json(run_cli(features["x"], features["y_shifted"], "--estimator", "linear", "--bandwidth", "2"))
    k = lambda a, b: np.exp(-((a - b) ** 2).sum(-1) / 8.0)  # noqa: E731
    x1, x2, y1, y2 = x[0::2], x[1::2], y_shifted[0::2], y_shifted[1::2]
    h = k(x1, x2) + k(y1, y2) - k(x1, y2) - k(x2, y1)
    assert linear["mmd2"] == pytest.approx(h.mean(), abs=1e-6)
    assert linear["test"] == "normal_approximation" and 0.0 <= linear["p_value"] < 0.05

    rff = last_json(
        run_cli(features["x"], features["y_shifted"], "--estimator", "rff", "--rff_features", "2048",
                "--bandwidth", "2")
    )
    exact = ref_mmd2(x, y_shifted, [2.0])[0]
    assert rff["rff_features"] == 2048 and rff["mmd2"] == pytest.approx(exact, abs=0.02)


@pytest.mark.parametrize(
    "x_name,y_name,extra,message",
    [
        ("x", "missing", (), "Y file not found"),
        ("three_d", "x", (), "must hold a 2-D"),
        ("x", "integers", (), "floating-point"),
        ("with_nan", "x", (), "NaN/Inf"),
        ("x", "wrong_dim", (), "feature dimensions differ"),
        ("not_npy", "x", (), "not a readable .npy"),
        ("x", "y_short", ("--estimator", "linear"), "need equal N"),
        ("x", "y_short", ("--permutations", "9", "--test", "sign-flip"), "need equal N"),
        ("x", "x", ("--estimator", "rff", "--permutations", "9"), "--permutations applies"),
        ("x", "x", ("--bandwidth", "0,1"), "--bandwidth must be"),
    ],
)
def test_bad_input_exits_with_a_clear_message(features, x_name, y_name, extra, message):
    x_path = features.get(x_name, "/nonexistent/x.npy")
    y_path = features.get(y_name, "/nonexistent/missing.npy")
    process = run_cli(x_path, y_path, *extra)
    assert process.returncode == 2
    assert message in process.stderr
    if message not in ("need equal N", "--permutations applies", "--bandwidth must be"):
        bad_path = y_path if y_name in ("missing", "integers", "wrong_dim") else x_path
        assert bad_path in process.stderr
