"""Tests of transfer_jax.alignment against plain NumPy float64 references written out below."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from scipy import stats as scipy_stats

from transfer_jax import alignment as al
from transfer_jax.alignment import _exact

# ------------------------------------------------------------------------------------------------------------
# NumPy float64 references (deliberately the textbook formulas: full Gram matrices, explicit loops)


def ref_sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)


def ref_gram(a, b, kind: str, sigmas) -> np.ndarray:
    d2 = ref_sq_dists(np.asarray(a, np.float64), np.asarray(b, np.float64))
    if kind == "gaussian":
        return sum(np.exp(-d2 / (2.0 * s * s)) for s in sigmas)
    return sum(np.exp(-np.sqrt(d2) / s) for s in sigmas)


def ref_mmd2(x, y, kind, sigmas) -> tuple[float, float]:
    """(unbiased U-statistic, biased V-statistic)."""
    kxx, kyy, kxy = ref_gram(x, x, kind, sigmas), ref_gram(y, y, kind, sigmas), ref_gram(x, y, kind, sigmas)
    m, n = len(x), len(y)
    unbiased = 0.0
    unbiased += (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    unbiased += (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    unbiased -= 2.0 * kxy.sum() / (m * n)
    biased = kxx.mean() + kyy.mean() - 2.0 * kxy.mean()
    return unbiased, biased


def ref_linear_mmd(x, y, kind, sigmas) -> tuple[float, float, float]:
    """(mean h, sample variance of h, one-sided normal p-value), pairs (2i, 2i+1)."""

    def k(a, b):
        return ref_gram(a[None], b[None], kind, sigmas)[0, 0]

    h = []
    for i in range(len(x) // 2):
        x1, x2, y1, y2 = x[2 * i], x[2 * i + 1], y[2 * i], y[2 * i + 1]
        h.append(k(x1, x2) + k(y1, y2) - k(x1, y2) - k(x2, y1))
    h = np.asarray(h)
    variance = h.var(ddof=1)
    p = scipy_stats.norm.sf(h.mean() / np.sqrt(variance / len(h)))
    return h.mean(), variance, p


def ref_median(points: np.ndarray) -> float:
    d = np.sqrt(ref_sq_dists(points, points))
    return float(np.median(d[np.triu_indices(len(points), k=1)]))


def ref_linear_cka(x, y) -> float:
    xc, yc = x - x.mean(0), y - y.mean(0)
    return np.linalg.norm(yc.T @ xc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc))


def ref_unbiased_hsic(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741
    """U-centred form (Székely & Rizzo), a different route to Song et al.'s unbiased HSIC."""

    def u_centre(g):
        n = len(g)
        g = g.copy()
        np.fill_diagonal(g, 0.0)
        means = g.sum(0) / (n - 2)
        means -= means.sum() / (2 * (n - 1))
        g = g - means[:, None] - means[None, :]
        np.fill_diagonal(g, 0.0)
        return g

    n = len(k)
    return float((u_centre(k) * u_centre(l)).sum() / (n * (n - 3)))


def ref_minibatch_cka(x, y, batch) -> float:
    sums = np.zeros(3)
    for i in range(len(x) // batch):
        xb, yb = x[i * batch : (i + 1) * batch], y[i * batch : (i + 1) * batch]
        k, l = xb @ xb.T, yb @ yb.T  # noqa: E741
        sums += [ref_unbiased_hsic(k, l), ref_unbiased_hsic(k, k), ref_unbiased_hsic(l, l)]
    return sums[0] / np.sqrt(sums[1] * sums[2])


# ------------------------------------------------------------------------------------------------------------
# helpers


def samples(seed: int, m: int, n: int, dim: int, shift: float = 0.0, offset: float = 0.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(m, dim)) + offset
    y = rng.normal(size=(n, dim)) * 1.2 + shift + offset
    return x, y


@functools.lru_cache(maxsize=None)
def data_mesh():
    return jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def f32(a) -> jax.Array:
    return jnp.asarray(a, jnp.float32)


def shard_rows(a):
    return jax.device_put(jnp.asarray(a), NamedSharding(data_mesh(), P("data", None)))


KERNELS = [("gaussian", (1.3,)), ("gaussian", (0.7, 2.0, 5.0)), ("laplace", (1.5,)), ("laplace", (0.9, 3.0))]


# ------------------------------------------------------------------------------------------------------------
# kernels and bandwidths


@pytest.mark.parametrize("kind,sigmas", KERNELS)
def test_kernel_gram_matches_reference(kind, sigmas):
    x, y = samples(0, 9, 7, 5)
    with jax.enable_x64(True):
        kernel = al.Kernel(bandwidths=jnp.asarray(sigmas, jnp.float64), kind=kind)
        gram = np.asarray(kernel(jnp.asarray(x), jnp.asarray(y)))
    np.testing.assert_allclose(gram, ref_gram(x, y, kind, sigmas), rtol=1e-10, atol=1e-12)


def test_median_heuristic_matches_numpy_median_of_pairwise_distances():
    x, y = samples(1, 23, 18, 6, shift=0.5, offset=20.0)
    expected = ref_median(np.concatenate([x, y]))
    with jax.enable_x64(True):
        got64 = float(al.median_heuristic(jnp.asarray(x), jnp.asarray(y)))
    np.testing.assert_allclose(got64, expected, rtol=1e-10)
    # float32 with a large common offset: centring keeps the Gram expansion accurate.
    got32 = float(jax.jit(al.median_heuristic)(f32(x), f32(y)))
    np.testing.assert_allclose(got32, expected, rtol=1e-5)
    # An odd number of pairs (n = 6: 15 pairs) takes the middle value itself.
    np.testing.assert_allclose(float(al.median_heuristic(f32(x[:6]))), ref_median(x[:6]), rtol=1e-5)


def test_median_heuristic_subsample_and_buffer_counts():
    x, y = samples(2, 40, 25, 4)
    budget = 20
    k_x, k_y = 10, 10  # half of the budget each (both sides have more than 10)
    subsample = np.concatenate([x[[i * 40 // k_x for i in range(k_x)]], y[[j * 25 // k_y for j in range(k_y)]]])
    with jax.enable_x64(True):
        got = float(al.median_heuristic(jnp.asarray(x), jnp.asarray(y), max_points=budget))
        # Only the first n_x / n_y rows of a buffer count; 8 + 11 <= budget, so this one is exact.
        counts = dict(n_x=jnp.asarray(8), n_y=jnp.asarray(11))
        in_buffer = float(al.median_heuristic(jnp.asarray(x), jnp.asarray(y), max_points=budget, **counts))
        # A small Y leaves its unused budget to X.
        unbalanced = float(al.median_heuristic(jnp.asarray(x), jnp.asarray(y[:4]), max_points=budget))
    np.testing.assert_allclose(got, ref_median(subsample), rtol=1e-10)
    np.testing.assert_allclose(in_buffer, ref_median(np.concatenate([x[:8], y[:11]])), rtol=1e-10)
    unbalanced_points = np.concatenate([x[[i * 40 // 16 for i in range(16)]], y[:4]])
    np.testing.assert_allclose(unbalanced, ref_median(unbalanced_points), rtol=1e-10)


def test_kernel_spec_resolves_median_times_multipliers_and_rejects_bad_values():
    x, y = samples(3, 12, 10, 3)
    spec = al.KernelSpec(kind="laplace", bandwidth="median", multipliers=(0.5, 1.0, 2.0))
    with jax.enable_x64(True):
        kernel = spec.resolve(jnp.asarray(x), jnp.asarray(y))
    median = ref_median(np.concatenate([x, y]))
    np.testing.assert_allclose(np.asarray(kernel.bandwidths), [0.5 * median, median, 2 * median], rtol=1e-10)
    fixed = al.KernelSpec(bandwidth=(1.0, 3.0), multipliers=(1.0, 10.0)).resolve(f32(x))
    np.testing.assert_allclose(np.asarray(fixed.bandwidths), [1.0, 10.0, 3.0, 30.0])
    with pytest.raises(ValueError, match="bandwidth"):
        al.KernelSpec(bandwidth="mean")
    with pytest.raises(ValueError, match="positive"):
        al.KernelSpec(bandwidth=(1.0, -2.0))
    with pytest.raises(ValueError, match="multipliers"):
        al.KernelSpec(multipliers=())
    with pytest.raises(ValueError, match="kernel kind"):
        al.KernelSpec(kind="cauchy")


# ------------------------------------------------------------------------------------------------------------
# exact estimators


@pytest.mark.parametrize("dtype,atol", [("float64", 1e-10), ("float32", 2e-6)])
@pytest.mark.parametrize("kind,sigmas", KERNELS)
def test_exact_estimators_match_reference(kind, sigmas, dtype, atol, highest_precision):
    x, y = samples(4, 37, 29, 7, shift=0.3)
    expected_u, expected_b = ref_mmd2(x, y, kind, sigmas)
    with jax.enable_x64(dtype == "float64"):
        kernel = al.Kernel(bandwidths=jnp.asarray(sigmas, dtype), kind=kind)
        estimate = jax.jit(functools.partial(al.mmd2_exact, tile=16))(
            jnp.asarray(x, dtype), jnp.asarray(y, dtype), kernel
        )
        assert estimate.unbiased.dtype == dtype
    np.testing.assert_allclose(float(estimate.unbiased), expected_u, rtol=0, atol=atol)
    np.testing.assert_allclose(float(estimate.biased), expected_b, rtol=0, atol=atol)


def test_exact_estimators_float32_with_large_offset(highest_precision):
    # Features with a large common mean (as after a ReLU/GELU) would lose the small distances in the
    # ||a||²+||b||²-2a·b expansion without the centring inside the estimator.
    x, y = samples(5, 60, 45, 16, shift=0.2, offset=50.0)
    sigma = ref_median(np.concatenate([x, y]))
    expected_u, expected_b = ref_mmd2(x, y, "gaussian", [sigma])
    estimate = jax.jit(functools.partial(al.mmd2_exact, tile=32))(
        f32(x), f32(y), al.KernelSpec()
    )
    np.testing.assert_allclose(float(estimate.bandwidths[0]), sigma, rtol=1e-5)
    np.testing.assert_allclose(float(estimate.unbiased), expected_u, atol=2e-6)
    np.testing.assert_allclose(float(estimate.biased), expected_b, atol=2e-6)


def test_tiled_equals_untiled():
    x, y = samples(6, 50, 41, 8, shift=0.4)
    kernel = al.gaussian([1.0, 4.0])
    results = {}
    for tile in (7, 16, 128):  # 91 pooled rows: 7 divides it, 16 leaves a ragged tile, 128 is a single tile
        fn = jax.jit(functools.partial(al.mmd2_exact, tile=tile))
        results[tile] = fn(f32(x), f32(y), kernel)
    for tile in (7, 16):
        np.testing.assert_allclose(float(results[tile].unbiased), float(results[128].unbiased), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(float(results[tile].biased), float(results[128].biased), rtol=1e-5, atol=1e-7)
    dense_u, dense_b = ref_mmd2(x, y, "gaussian", [1.0, 4.0])
    np.testing.assert_allclose(float(results[128].unbiased), dense_u, atol=1e-6)


def test_streaming_exact_in_uneven_shards_equals_one_shot():
    x, y = samples(7, 45, 38, 6, shift=0.25)
    estimator = al.ExactMMD(kernel=al.KernelSpec(multipliers=(0.5, 2.0)), tile=8)
    update = jax.jit(estimator.update)
    finalize = jax.jit(estimator.finalize)
    state = estimator.init(6, capacity_x=48, capacity_y=40)
    # Uneven and mismatched shards, one update with no Y shard at all.
    for (x0, x1), (y0, y1) in zip([(0, 3), (3, 20), (20, 21), (21, 45)], [(0, 11), (11, 11), (11, 30), (30, 38)]):
        state = update(state, f32(x[x0:x1]), f32(y[y0:y1]) if y1 > y0 else None)
    streamed = finalize(state)
    one_shot = jax.jit(functools.partial(al.mmd2_exact, tile=8))(f32(x), f32(y), estimator.kernel)
    np.testing.assert_allclose(np.asarray(streamed.bandwidths), np.asarray(one_shot.bandwidths), rtol=1e-6)
    np.testing.assert_allclose(float(streamed.mmd2_unbiased), float(one_shot.unbiased), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(streamed.mmd2_biased), float(one_shot.biased), rtol=1e-5, atol=1e-7)
    sigma = ref_median(np.concatenate([x, y]))
    expected_u = ref_mmd2(x, y, "gaussian", [sigma / 2, 2 * sigma])[0]
    np.testing.assert_allclose(float(streamed.mmd2_unbiased), expected_u, atol=1e-6)
    # Overflowing the buffer is reported as NaN, not as a truncated value.
    overflowed = finalize(update(state, jnp.ones((5, 6), jnp.float32), None))
    assert np.isnan(float(overflowed.mmd2_unbiased))


def test_exact_matches_across_sizes_with_fixed_bandwidths_passed_to_finalize():
    x, y = samples(8, 30, 30, 4, shift=0.5)
    estimator = al.ExactMMD(tile=16)
    state = estimator.update(estimator.init(4, 32, dtype=jnp.float32), f32(x), f32(y))
    result = jax.jit(estimator.finalize)(state, jnp.asarray([0.8, 2.5], jnp.float32))
    expected_u, expected_b = ref_mmd2(x, y, "gaussian", [0.8, 2.5])
    np.testing.assert_allclose(float(result.mmd2_unbiased), expected_u, atol=1e-6)
    np.testing.assert_allclose(float(result.mmd2_biased), expected_b, atol=1e-6)


def test_sharded_over_eight_devices_equals_single_device():
    x, y = samples(9, 64, 48, 12, shift=0.3)
    xs, ys = shard_rows(x.astype(np.float32)), shard_rows(y.astype(np.float32))
    assert len(xs.sharding.device_set) == 8
    kernel = al.KernelSpec(multipliers=(0.5, 1.0, 2.0))
    single = jax.jit(functools.partial(al.mmd2_exact, tile=16))(f32(x), f32(y), kernel)
    # (a) compiler-propagated sharding, (b) explicit shard_map split of the Gram work.
    propagated = jax.jit(functools.partial(al.mmd2_exact, tile=16))(xs, ys, kernel)
    split = jax.jit(functools.partial(al.mmd2_exact, tile=16, mesh=data_mesh()))(xs, ys, kernel)
    for result in (propagated, split):
        np.testing.assert_allclose(float(result.unbiased), float(single.unbiased), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(float(result.biased), float(single.biased), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(np.asarray(result.bandwidths), np.asarray(single.bandwidths), rtol=1e-6)

    # Streaming with sharded buffers and sharded shards, Gram work split over the mesh.
    estimator = al.ExactMMD(kernel=kernel, tile=16, mesh=data_mesh())
    state = estimator.init(12, capacity_x=64, capacity_y=64)
    assert len(state.x.sharding.device_set) == 8
    update = jax.jit(estimator.update)
    state = update(state, xs[:32], ys[:24])
    state = update(state, xs[32:], ys[24:])
    streamed = jax.jit(estimator.finalize)(state)
    np.testing.assert_allclose(float(streamed.mmd2_unbiased), float(single.unbiased), rtol=1e-5, atol=1e-7)

    # The other estimators and CKA on sharded paired features, against the references / the unsharded RFF.
    x_paired, y_paired = x[:48], y[:48]
    spec = al.AlignmentSpec(estimators=("linear", "rff"), cka_minibatch_size=16, rff_features=64)
    key = jax.random.key(0)
    on_mesh = jax.jit(functools.partial(al.compute_alignment, spec, mesh=data_mesh()))(
        shard_rows(f32(x_paired)), shard_rows(f32(y_paired)), key
    )
    sigma = float(on_mesh["bandwidth"])
    np.testing.assert_allclose(sigma, ref_median(np.concatenate([x_paired, y_paired])), rtol=1e-5)
    expected_linear = ref_linear_mmd(x_paired, y_paired, "gaussian", [sigma])
    np.testing.assert_allclose(float(on_mesh["mmd2_linear"]), expected_linear[0], atol=1e-6)
    np.testing.assert_allclose(float(on_mesh["p_value_linear"]), expected_linear[2], atol=1e-5)
    np.testing.assert_allclose(float(on_mesh["cka_minibatch"]), ref_minibatch_cka(x_paired, y_paired, 16), rtol=1e-4)
    rff_key = jax.random.fold_in(key, 0)  # the key compute_alignment uses for the frequencies
    rff_one_device = jax.jit(functools.partial(al.mmd2_rff, num_features=64))(
        f32(x_paired), f32(y_paired), al.gaussian(sigma), key=rff_key
    )
    np.testing.assert_allclose(float(on_mesh["mmd2_rff"]), float(rff_one_device.unbiased), rtol=1e-4, atol=1e-6)


def test_exact_rejects_bad_inputs():
    good = jnp.zeros((10, 3))
    with pytest.raises(ValueError, match="same feature dimension"):
        al.mmd2_unbiased(good, jnp.zeros((10, 4)), al.gaussian(1.0))
    with pytest.raises(ValueError, match="2-D"):
        al.mmd2_unbiased(jnp.zeros((10,)), good, al.gaussian(1.0))
    with pytest.raises(ValueError, match="floating"):
        al.mmd2_unbiased(jnp.zeros((10, 3), jnp.int32), good, al.gaussian(1.0))
    with pytest.raises(ValueError, match="at least 2 rows"):
        al.mmd2_unbiased(good[:1], good, al.gaussian(1.0))
    with pytest.raises(ValueError, match="tile"):
        al.mmd2_unbiased(good, good, al.gaussian(1.0), tile=0)
    with pytest.raises(ValueError, match="as many x as y rows"):
        al.sign_flip_test(good, good[:8], al.gaussian(1.0), key=jax.random.key(0), num_flips=9)
    with pytest.raises(ValueError, match="multiples"):
        al.ExactMMD(mesh=data_mesh()).init(3, capacity_x=12)


# ------------------------------------------------------------------------------------------------------------
# linear-time and random-feature estimators


@pytest.mark.parametrize("kind,sigmas", [KERNELS[1], KERNELS[2]])
def test_linear_time_matches_reference_float64(kind, sigmas):
    x, y = samples(10, 41, 41, 5, shift=0.3)  # odd N: the last row is unused
    expected = ref_linear_mmd(x, y, kind, sigmas)
    with jax.enable_x64(True):
        result = jax.jit(al.mmd2_linear)(jnp.asarray(x), jnp.asarray(y), al.Kernel(jnp.asarray(sigmas), kind))
    got = [float(result.mmd2), float(result.variance), float(result.p_value)]
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
    assert float(result.num_pairs) == 20


def test_linear_time_streaming_equals_one_shot():
    x, y = samples(11, 60, 60, 4, shift=0.2)
    kernel = al.gaussian([1.0, 3.0])
    estimator = al.LinearTimeMMD()
    state = estimator.init(kernel)
    update = jax.jit(estimator.update)
    for start, stop in [(0, 10), (10, 16), (16, 44), (44, 60)]:  # even shards: same pairs as one shot
        state = update(state, jnp.asarray(x[start:stop], jnp.float32), jnp.asarray(y[start:stop], jnp.float32))
    streamed = estimator.finalize(state)
    one_shot = jax.jit(al.mmd2_linear)(f32(x), f32(y), kernel)
    for a, b in zip(streamed, one_shot):
        np.testing.assert_allclose(float(a), float(b), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="as many x as y rows"):
        estimator.update(state, jnp.zeros((4, 4)), jnp.zeros((6, 4)))


def test_rff_matches_reference_with_the_same_frequencies():
    x, y = samples(12, 33, 27, 6, shift=0.3)
    estimator = al.RandomFeatureMMD(num_features=50)
    with jax.enable_x64(True):

        @jax.jit
        def run(x, y, key):
            state = estimator.init(key, 6, al.Kernel(jnp.asarray([1.0, 2.5]), "gaussian"), dtype=jnp.float64)
            state = estimator.update(state, x[:20], y[:5])
            state = estimator.update(state, x[20:], y[5:])
            return state, estimator.finalize(state)

        state, result = run(jnp.asarray(x), jnp.asarray(y), jax.random.key(3))
        frequencies, scale, shift = (np.asarray(a) for a in (state.frequencies, state.feature_scale, state.shift))
    np.testing.assert_allclose(scale**2, 1 / 25)  # 50 frequencies split evenly over the 2 bandwidths

    def phi(a):
        angles = (a - shift) @ frequencies.T
        return np.concatenate([np.cos(angles) * scale, np.sin(angles) * scale], axis=1)

    gram = lambda a, b: phi(a) @ phi(b).T  # noqa: E731
    kxx, kyy, kxy = gram(x, x), gram(y, y), gram(x, y)
    m, n = len(x), len(y)
    expected_u = (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    expected_u -= 2 * kxy.mean()
    expected_b = kxx.mean() + kyy.mean() - 2 * kxy.mean()
    np.testing.assert_allclose([float(result.unbiased), float(result.biased)], [expected_u, expected_b], atol=1e-10)


@pytest.mark.parametrize("kind", ["gaussian", "laplace"])
def test_rff_error_decreases_as_features_grow(kind):
    x, y = samples(13, 64, 64, 4, shift=0.5)
    sigmas = [1.0, 3.0]
    exact = ref_mmd2(x, y, kind, sigmas)[0]
    kernel = al.Kernel(jnp.asarray(sigmas, jnp.float32), kind)
    xs, ys = f32(x), f32(y)
    errors = {}
    for r in (16, 256, 4096):
        fn = jax.jit(lambda key, r=r: al.mmd2_rff(xs, ys, kernel, key=key, num_features=r).unbiased)
        estimates = np.array([float(fn(jax.random.key(s))) for s in range(6)])
        errors[r] = np.sqrt(np.mean((estimates - exact) ** 2))
    assert errors[4096] < errors[256] < errors[16], errors
    assert errors[4096] < 0.2 * errors[16], errors


# ------------------------------------------------------------------------------------------------------------
# behaviour under the null and under a shift; significance tests


def test_unbiased_mean_is_zero_under_null_and_biased_is_not():
    rng = np.random.default_rng(14)
    draws = jnp.asarray(rng.normal(size=(300, 2, 20, 3)), jnp.float32)
    kernel = al.gaussian(1.5)
    estimate = jax.jit(jax.vmap(lambda d: al.mmd2_exact(d[0], d[1], kernel, tile=16)))(draws)
    unbiased, biased = np.asarray(estimate.unbiased), np.asarray(estimate.biased)
    standard_error = unbiased.std(ddof=1) / np.sqrt(len(unbiased))
    assert abs(unbiased.mean()) < 3 * standard_error, (unbiased.mean(), standard_error)
    assert biased.mean() > 10 * standard_error  # the V-statistic's O(1/n) upward bias is visible


def _null_p_values(method: str, num_datasets: int = 80, n: int = 20, draws: int = 49):
    rng = np.random.default_rng(15)
    if method == "permutation":
        data = rng.normal(size=(num_datasets, 2, n, 3))
    else:  # paired null: x_i and y_i exchangeable around a shared per-input mean
        common = rng.normal(size=(num_datasets, 1, n, 3)) * 2.0
        data = common + rng.normal(size=(num_datasets, 2, n, 3))
    kernel = al.gaussian(2.0)

    def one(d, key):
        return al.relabelling_test(d[0], d[1], kernel, key, draws, method=method, tile=16).p_value_unbiased

    keys = jax.random.split(jax.random.key(1), num_datasets)
    return np.asarray(jax.jit(jax.vmap(one))(jnp.asarray(data, jnp.float32), keys))


@pytest.mark.parametrize("method", ["permutation", "sign_flip"])
def test_p_values_are_uniform_under_the_null(method):
    p = _null_p_values(method)
    assert np.all((p > 0) & (p <= 1))
    assert scipy_stats.kstest(p, "uniform").pvalue > 0.01, np.sort(p)
    assert 0.02 <= np.mean(p <= 0.1) <= 0.22, np.mean(p <= 0.1)


def test_p_values_are_small_under_a_mean_shift():
    x, y = samples(16, 64, 64, 4, shift=0.8)
    xs, ys = f32(x), f32(y)
    kernel = al.KernelSpec()
    key = jax.random.key(2)
    perm = jax.jit(functools.partial(al.permutation_test, num_permutations=199, tile=32))(xs, ys, kernel, key=key)
    flip = jax.jit(functools.partial(al.sign_flip_test, num_flips=199, tile=32))(xs, ys, kernel, key=key)
    for result in (perm, flip):
        assert float(result.p_value_unbiased) == pytest.approx(1 / 200)
        assert float(result.p_value_biased) == pytest.approx(1 / 200)
    x, y = samples(17, 512, 512, 4, shift=0.8)
    linear = jax.jit(al.mmd2_linear)(f32(x), f32(y), al.gaussian(2.0))
    assert float(linear.p_value) < 1e-3
    x, y = samples(18, 512, 512, 4, shift=0.0)
    y = y / 1.2  # same distribution
    linear_null = jax.jit(al.mmd2_linear)(f32(x), f32(y), al.gaussian(2.0))
    assert float(linear_null.p_value) > 0.01


@pytest.mark.parametrize("method", ["permutation", "sign_flip"])
def test_relabelled_statistics_match_numpy_on_the_same_relabellings(method):
    """Every draw's statistic equals the reference MMD² of the relabelled data, and p follows the formula.

    The inputs are partially filled buffers (capacity 16): padding rows must never be drawn into a group.
    """
    n_x, n_y = (14, 11) if method == "permutation" else (14, 14)
    x, y = samples(19, 16, 16, 3, shift=0.4)
    x[n_x:], y[n_y:] = np.nan, 1e3  # garbage in the unused buffer rows
    sigmas = (1.1, 2.0)
    key, num_draws = jax.random.key(7), 12
    with jax.enable_x64(True):
        kernel = al.Kernel(jnp.asarray(sigmas), "gaussian")
        run = jax.jit(
            functools.partial(
                _exact.relabelled_statistics, num_draws=num_draws, method=method, tile=8, draws_per_pass=5
            )
        )
        stats = run(jnp.asarray(x), jnp.asarray(y), kernel, n_x=jnp.asarray(n_x), n_y=jnp.asarray(n_y), key=key)
        valid_x, valid_y = jnp.arange(16) < n_x, jnp.arange(16) < n_y
        draw_keys = [jax.random.fold_in(key, b) for b in range(1, num_draws + 1)]
        if method == "permutation":
            labels = [np.asarray(_exact.permutation_labels(k, valid_x, valid_y, jnp.asarray(n_x))) for k in draw_keys]
        else:
            labels = [np.asarray(_exact.sign_flip_labels(k, valid_x, valid_y)) for k in draw_keys]
    valid = np.concatenate([np.arange(16) < n_x, np.arange(16) < n_y])
    pooled = np.concatenate([x, y])
    expected = [ref_mmd2(x[:n_x], y[:n_y], "gaussian", sigmas)]
    for in_x in labels:
        assert in_x.sum() == n_x and not np.any(in_x & ~valid)
        if method == "sign_flip":  # exactly one of each pair (x_i, y_i) is in group X
            assert np.all(in_x[:n_x] ^ in_x[16 : 16 + n_y])
        expected.append(ref_mmd2(pooled[in_x], pooled[valid & ~in_x], "gaussian", sigmas))
    expected = np.asarray(expected)
    np.testing.assert_allclose(np.asarray(stats.unbiased), expected[:, 0], atol=1e-10)
    np.testing.assert_allclose(np.asarray(stats.biased), expected[:, 1], atol=1e-10)
    assert len({tuple(label) for label in labels}) > num_draws // 2  # the draws differ
    expected_p = (1 + np.sum(expected[1:, 0] >= expected[0, 0])) / (num_draws + 1)
    with jax.enable_x64(True):
        assert float(_exact.permutation_p_value(stats.unbiased)) == pytest.approx(expected_p)


def test_streaming_state_test_matches_pure_function():
    x, y = samples(20, 24, 24, 3, shift=0.3)
    estimator = al.ExactMMD(tile=16, draws_per_pass=40)
    key = jax.random.key(4)

    @jax.jit
    def streamed(x, y, key):
        state = estimator.init(3, 24)
        state = estimator.update(state, x[:10], y[:17])
        state = estimator.update(state, x[10:], y[17:])
        return estimator.test(state, key, 99, "sign_flip")

    pure = jax.jit(functools.partial(al.sign_flip_test, num_flips=99, tile=16, draws_per_pass=40))
    result, expected = streamed(f32(x), f32(y), key), pure(f32(x), f32(y), key=key)
    # A full buffer sees exactly the same draws as the pure function: same statistics and p-values.
    for name in ("mmd2_unbiased", "mmd2_biased", "p_value_unbiased", "p_value_biased", "bandwidths"):
        np.testing.assert_allclose(np.asarray(getattr(result, name)), np.asarray(getattr(expected, name)), rtol=1e-6)
    assert 1 / 100 < float(result.p_value_unbiased) < 1


def test_permutation_p_value_formula():
    stats = jnp.asarray([0.5, 0.1, 0.7, 0.5, -0.2])  # observed first; two of four draws are >= it
    assert float(al.permutation_p_value(stats)) == pytest.approx(3 / 5)
    assert np.isnan(float(al.permutation_p_value(jnp.asarray([jnp.nan, 0.1]))))


# ------------------------------------------------------------------------------------------------------------
# CKA


def test_linear_cka_matches_reference_and_invariances():
    rng = np.random.default_rng(21)
    x = rng.normal(size=(40, 8)) + 3.0
    y = x @ rng.normal(size=(8, 6)) + 0.5 * rng.normal(size=(40, 6))
    expected = ref_linear_cka(x, y)
    with jax.enable_x64(True):
        cka = jax.jit(al.linear_cka)
        np.testing.assert_allclose(float(cka(jnp.asarray(x), jnp.asarray(y))), expected, rtol=1e-10)
        np.testing.assert_allclose(float(cka(jnp.asarray(x), jnp.asarray(x))), 1.0, rtol=1e-12)
        rotation, _ = np.linalg.qr(rng.normal(size=(6, 6)))
        np.testing.assert_allclose(float(cka(jnp.asarray(x), jnp.asarray(y @ rotation * 7.5))), expected, rtol=1e-10)
        # ... but not invariant to an anisotropic rescaling (so the invariance check above can fail).
        stretched = float(cka(jnp.asarray(x), jnp.asarray(y * np.arange(1, 7))))
        assert abs(stretched - expected) > 1e-3
    assert 0.0 < expected < 1.0


def test_streaming_linear_cka_equals_one_shot():
    rng = np.random.default_rng(22)
    x = rng.normal(size=(50, 5)) + 100.0  # large mean: the shifted accumulation must not cancel
    y = np.tanh(x - 100.0) @ rng.normal(size=(5, 3))
    estimator = al.LinearCKA()
    state = estimator.init(5, 3)
    update = jax.jit(estimator.update)
    for start, stop in [(0, 7), (7, 30), (30, 50)]:
        state = update(state, jnp.asarray(x[start:stop], jnp.float32), jnp.asarray(y[start:stop], jnp.float32))
    np.testing.assert_allclose(float(estimator.finalize(state)), ref_linear_cka(x, y), rtol=1e-4)


def test_unbiased_hsic_and_minibatch_cka_match_reference():
    rng = np.random.default_rng(23)
    x = rng.normal(size=(48, 6))
    y = x[:, :4] * 2.0 + rng.normal(size=(48, 4))
    k, l = x[:10] @ x[:10].T, y[:10] @ y[:10].T  # noqa: E741
    with jax.enable_x64(True):
        hsic = float(al.unbiased_hsic(jnp.asarray(k), jnp.asarray(l)))
        np.testing.assert_allclose(hsic, ref_unbiased_hsic(k, l), rtol=1e-10)
        got = float(jax.jit(al.minibatch_cka, static_argnums=2)(jnp.asarray(x), jnp.asarray(y), 12))
        np.testing.assert_allclose(got, ref_minibatch_cka(x, y, 12), rtol=1e-10)
        # A remainder smaller than a batch is dropped: 48 rows in batches of 20 use rows 0..39.
        got20 = float(al.minibatch_cka(jnp.asarray(x), jnp.asarray(y), 20))
        np.testing.assert_allclose(got20, ref_minibatch_cka(x[:40], y[:40], 20), rtol=1e-10)
        identical = float(al.minibatch_cka(jnp.asarray(x), jnp.asarray(x), 12))
    np.testing.assert_allclose(identical, 1.0, rtol=1e-12)
    with pytest.raises(ValueError, match="at least 4"):
        al.unbiased_hsic(jnp.eye(3), jnp.eye(3))
    with pytest.raises(ValueError, match="same number of rows"):
        al.linear_cka(jnp.zeros((5, 2)), jnp.zeros((6, 2)))


# ------------------------------------------------------------------------------------------------------------
# top-level API, jit and host transfers


def test_compute_alignment_matches_the_individual_estimators():
    x, y = samples(24, 32, 32, 5, shift=0.3)
    xs, ys = f32(x), f32(y)
    spec = al.AlignmentSpec(
        estimators=("unbiased", "biased", "linear", "rff"), multipliers=(0.5, 2.0), permutations=19,
        tests=("permutation", "sign_flip"), cka=True, cka_minibatch_size=8, rff_features=128, tile=16,
    )
    key = jax.random.key(5)
    out = jax.jit(functools.partial(al.compute_alignment, spec))(xs, ys, key)
    assert set(out) == {
        "bandwidth_0", "bandwidth_1", "mmd2_unbiased", "mmd2_biased", "mmd2_linear", "p_value_linear", "mmd2_rff",
        "p_value_unbiased_permutation", "p_value_biased_permutation", "p_value_unbiased_sign_flip",
        "p_value_biased_sign_flip", "cka_linear", "cka_minibatch",
    }
    assert all(v.shape == () for v in out.values())
    sigma = ref_median(np.concatenate([x, y]))
    bandwidths = [float(out["bandwidth_0"]), float(out["bandwidth_1"])]
    np.testing.assert_allclose(bandwidths, [sigma / 2, 2 * sigma], rtol=1e-5)
    expected_u, expected_b = ref_mmd2(x, y, "gaussian", [sigma / 2, 2 * sigma])
    np.testing.assert_allclose(float(out["mmd2_unbiased"]), expected_u, atol=1e-6)
    np.testing.assert_allclose(float(out["mmd2_biased"]), expected_b, atol=1e-6)
    expected_linear = ref_linear_mmd(x, y, "gaussian", [sigma / 2, 2 * sigma])[0]
    np.testing.assert_allclose(float(out["mmd2_linear"]), expected_linear, atol=1e-6)
    np.testing.assert_allclose(float(out["cka_linear"]), ref_linear_cka(x, y), rtol=1e-5)
    np.testing.assert_allclose(float(out["cka_minibatch"]), ref_minibatch_cka(x, y, 8), rtol=1e-4)
    assert abs(float(out["mmd2_rff"]) - expected_u) < 0.05
    for name in ("p_value_unbiased_permutation", "p_value_unbiased_sign_flip"):
        assert 1 / 20 <= float(out[name]) <= 1.0

    # Fixed bandwidths in the spec, and explicit bandwidths overriding the rule.
    fixed_spec = al.AlignmentSpec(bandwidth=(1.5,), kernel="laplace", cka=False, tile=16)
    fixed = jax.jit(functools.partial(al.compute_alignment, fixed_spec))(xs, ys)
    assert set(fixed) == {"bandwidth", "mmd2_unbiased"}
    np.testing.assert_allclose(float(fixed["mmd2_unbiased"]), ref_mmd2(x, y, "laplace", [1.5])[0], atol=1e-6)
    override_fn = jax.jit(functools.partial(al.compute_alignment, al.AlignmentSpec(cka=False, tile=16)))
    override = override_fn(xs, ys, bandwidths=jnp.asarray([1.5]))
    np.testing.assert_allclose(float(override["mmd2_unbiased"]), ref_mmd2(x, y, "gaussian", [1.5])[0], atol=1e-6)


def test_alignment_spec_and_compute_alignment_reject_bad_requests():
    with pytest.raises(ValueError, match="estimators"):
        al.AlignmentSpec(estimators=("exact",))
    with pytest.raises(ValueError, match="tuple"):
        al.AlignmentSpec(estimators="unbiased")
    with pytest.raises(ValueError, match="exact estimator"):
        al.AlignmentSpec(estimators=("linear",), permutations=10)
    with pytest.raises(ValueError, match="tests"):
        al.AlignmentSpec(tests=("bootstrap",))
    with pytest.raises(ValueError, match="equal N"):
        al.compute_alignment(al.AlignmentSpec(cka=True), jnp.zeros((10, 3)), jnp.zeros((12, 3)))
    with pytest.raises(ValueError, match="PRNG key"):
        al.compute_alignment(al.AlignmentSpec(estimators=("rff",), cka=False), jnp.zeros((10, 3)), jnp.zeros((10, 3)))
    # Unequal N is fine for the unpaired estimators.
    x, y = samples(25, 12, 9, 3)
    spec = al.AlignmentSpec(estimators=("unbiased", "biased"), cka=False, tile=8)
    out = jax.jit(functools.partial(al.compute_alignment, spec))(f32(x), f32(y))
    expected_b = ref_mmd2(x, y, "gaussian", [ref_median(np.concatenate([x, y]))])[1]
    np.testing.assert_allclose(float(out["mmd2_biased"]), expected_b, atol=1e-6)


def test_streaming_and_compute_alignment_run_under_disallowed_transfers():
    x, y = samples(26, 32, 32, 4, shift=0.3)
    device = jax.devices()[0]
    xs, ys = jax.device_put(f32(x), device), jax.device_put(f32(y), device)
    key = jax.device_put(jax.random.key(0), device)
    exact = al.ExactMMD(tile=16)
    rff = al.RandomFeatureMMD(num_features=32)
    linear = al.LinearTimeMMD()
    cka = al.MinibatchCKA()

    @jax.jit
    def run(xs, ys, key):
        kernel = al.KernelSpec().resolve(xs[:16], ys[:16])
        states = (exact.init(4, 32), rff.init(key, 4, kernel), linear.init(kernel), cka.init())
        for start in (0, 16):
            xb, yb = xs[start : start + 16], ys[start : start + 16]
            states = (
                exact.update(states[0], xb, yb), rff.update(states[1], xb, yb),
                linear.update(states[2], xb, yb), cka.update(states[3], xb, yb),
            )
        return (
            exact.finalize(states[0]).mmd2_unbiased, rff.finalize(states[1]).unbiased,
            linear.finalize(states[2]).p_value, cka.finalize(states[3]),
        )

    spec = al.AlignmentSpec(
        estimators=("unbiased", "linear", "rff"), permutations=9, cka_minibatch_size=8, rff_features=32, tile=16
    )
    aligned = jax.jit(functools.partial(al.compute_alignment, spec))
    run(xs, ys, key)  # compile outside the guard
    aligned(xs, ys, key)
    with jax.transfer_guard("disallow"):
        results = run(xs, ys, key)
        metrics = aligned(xs, ys, key)
        jax.block_until_ready((results, metrics))
    assert all(np.isfinite(float(r)) for r in results)
    assert all(np.isfinite(float(v)) for v in metrics.values())
    # And the guard really bites on host data.
    with jax.transfer_guard("disallow"), pytest.raises(Exception, match="[Dd]isallowed"):
        jax.block_until_ready(aligned(np.asarray(x, np.float32), np.asarray(y, np.float32), key))


def test_streaming_states_can_be_donated():
    """Every state leaf is its own buffer: a jitted update may donate the whole state."""
    x, y = f32(np.ones((8, 3))), f32(np.zeros((8, 3)))
    kernel = al.gaussian(1.0)
    cases = [
        (al.ExactMMD(tile=8), al.ExactMMD().init(3, 16)),
        (al.LinearTimeMMD(), al.LinearTimeMMD().init(kernel)),
        (al.RandomFeatureMMD(num_features=8), al.RandomFeatureMMD(num_features=8).init(jax.random.key(0), 3, kernel)),
        (al.MinibatchCKA(), al.MinibatchCKA().init()),
        (al.LinearCKA(), al.LinearCKA().init(3, 3)),
    ]
    for estimator, state in cases:
        updated = jax.jit(estimator.update, donate_argnums=0)(state, x, y)
        assert jax.tree.structure(updated) == jax.tree.structure(state)
