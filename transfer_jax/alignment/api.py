"""One-call alignment measurement for the training loop: :class:`AlignmentSpec` and :func:`compute_alignment`.

``compute_alignment(spec, x, y, key)`` is pure and jittable with ``spec`` static; it returns a flat dict of scalar
device arrays (nothing is fetched to the host, so it runs under ``jax.transfer_guard("disallow")``)::

    step = jax.jit(functools.partial(compute_alignment, spec))
    metrics = step(features_pretrained, features_finetuned, key)

Keys (present according to the spec):

* ``mmd2_unbiased``, ``mmd2_biased`` (exact, tiled), ``mmd2_linear``, ``mmd2_rff`` (unbiased RFF estimate);
* ``p_value_linear`` (normal approximation, always with ``'linear'``);
* ``p_value_<unbiased|biased>_<permutation|sign_flip>`` when ``permutations > 0``;
* ``cka_linear`` and, with ``cka_minibatch_size``, ``cka_minibatch``;
* ``bandwidth`` (one kernel) or ``bandwidth_0``, ``bandwidth_1``, ... (several): the σ values used, after
  multipliers, in the order base-major (σ_base₀·m₀, σ_base₀·m₁, ...).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from transfer_jax.alignment import _exact, cka, mmd
from transfer_jax.alignment.kernels import DEFAULT_MEDIAN_MAX_POINTS, KernelSpec

ESTIMATORS: tuple[str, ...] = ("unbiased", "biased", "linear", "rff")
EXACT_ESTIMATORS: tuple[str, ...] = ("unbiased", "biased")


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class AlignmentSpec:
    """What :func:`compute_alignment` measures (frozen, hashable, and a static pytree: jit treats it as static).

    Attributes:
      estimators: subset of ``('unbiased', 'biased', 'linear', 'rff')``.
      kernel: ``'gaussian'`` or ``'laplace'``.
      bandwidth: ``'median'`` (pooled median heuristic) or a tuple of fixed σ values.
      multipliers: each base σ is multiplied by every multiplier; the kernels are summed.
      permutations: B draws for the exact estimators' tests (0: no test).
      tests: which relabelling tests to run when ``permutations > 0``: ``'permutation'`` and/or ``'sign_flip'``
        (the latter for paired before/after features; needs equal N).
      cka: also report linear CKA (needs equal N).
      cka_minibatch_size: also report minibatch CKA with this batch size (None: off).
      rff_features: number of random frequencies R for ``'rff'``.
      tile: rows per tile of the exact Gram computation.
      median_max_points: subsample budget of the median heuristic.
      draws_per_pass: test draws per pass over the Gram tiles (memory O(N · draws_per_pass)).
    """

    estimators: tuple[str, ...] = ("unbiased",)
    kernel: str = "gaussian"
    bandwidth: str | tuple[float, ...] = "median"
    multipliers: tuple[float, ...] = (1.0,)
    permutations: int = 0
    tests: tuple[str, ...] = ("permutation",)
    cka: bool = True
    cka_minibatch_size: int | None = None
    rff_features: int = 1024
    tile: int = mmd.DEFAULT_TILE
    median_max_points: int = DEFAULT_MEDIAN_MAX_POINTS
    draws_per_pass: int = _exact.DEFAULT_DRAWS_PER_PASS

    def __post_init__(self) -> None:
        for field in ("estimators", "tests", "multipliers"):
            value = getattr(self, field)
            if isinstance(value, str) or not isinstance(value, (tuple, list)):
                raise ValueError(f"AlignmentSpec.{field} must be a tuple, got {value!r}")
            object.__setattr__(self, field, tuple(value))
        if not isinstance(self.bandwidth, str):
            object.__setattr__(self, "bandwidth", tuple(self.bandwidth))
        unknown = [e for e in self.estimators if e not in ESTIMATORS]
        if unknown or not self.estimators:
            raise ValueError(
                f"AlignmentSpec.estimators must be a non-empty subset of {ESTIMATORS}, got {self.estimators}"
            )
        unknown = [t for t in self.tests if t not in _exact.RELABELLING_METHODS]
        if unknown:
            raise ValueError(f"AlignmentSpec.tests must be a subset of {_exact.RELABELLING_METHODS}, got {self.tests}")
        if self.permutations < 0:
            raise ValueError(f"AlignmentSpec.permutations must be >= 0, got {self.permutations}")
        if self.permutations and not set(self.estimators) & set(EXACT_ESTIMATORS):
            raise ValueError("AlignmentSpec.permutations > 0 needs an exact estimator ('unbiased' or 'biased')")
        if self.cka_minibatch_size is not None and self.cka_minibatch_size < 4:
            raise ValueError(f"AlignmentSpec.cka_minibatch_size must be >= 4, got {self.cka_minibatch_size}")
        if self.rff_features < 1 or self.tile < 1 or self.draws_per_pass < 1:
            raise ValueError("AlignmentSpec.rff_features, tile and draws_per_pass must be positive")
        _ = self.kernel_spec  # building it validates kernel, bandwidth and multipliers

    @property
    def kernel_spec(self) -> KernelSpec:
        return KernelSpec(
            kind=self.kernel,
            bandwidth=self.bandwidth,
            multipliers=self.multipliers,
            median_max_points=self.median_max_points,
        )

    @property
    def needs_paired(self) -> bool:
        """True if some requested quantity pairs x_i with y_i (and so needs len(x) == len(y))."""
        return (
            "linear" in self.estimators
            or self.cka
            or self.cka_minibatch_size is not None
            or (self.permutations > 0 and "sign_flip" in self.tests)
        )


def compute_alignment(
    spec: AlignmentSpec,
    x: jax.Array,
    y: jax.Array,
    key: jax.Array | None = None,
    *,
    bandwidths: jax.Array | None = None,
    mesh: Mesh | None = None,
    data_axis: str = "data",
) -> dict[str, jax.Array]:
    """All alignment measures of ``spec`` between features ``x`` (e.g. pretrained) and ``y`` (fine-tuned).

    Args:
      spec: static :class:`AlignmentSpec`.
      x, y: ``(N_x, D)`` and ``(N_y, D)`` features (equal N where the spec pairs rows; see ``needs_paired``).
      key: PRNG key, needed for ``'rff'`` (frequencies from ``fold_in(key, 0)``) and for tests
        (``permutations > 0``; test i of ``spec.tests`` uses ``fold_in(fold_in(key, 1), i)``).
      bandwidths: optional explicit σ values (after multipliers), overriding the spec's rule, e.g. to keep the
        kernel fixed across a run.
      mesh, data_axis: optional mesh sharding the rows; splits the exact Gram work across its devices.

    Returns:
      dict of scalar device arrays; see the module docstring for the keys.
    """
    mmd._check_features(x, y, what="compute_alignment")
    if spec.needs_paired and x.shape[0] != y.shape[0]:
        raise ValueError(
            "compute_alignment: linear-time MMD, CKA and the sign-flip test pair x_i with y_i and need equal N, "
            f"got {x.shape[0]} and {y.shape[0]}"
        )
    if key is None and ("rff" in spec.estimators or spec.permutations > 0):
        raise ValueError("compute_alignment: a PRNG key is needed for 'rff' and for permutation / sign-flip tests")
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError(f"compute_alignment: needs at least 2 rows in x and in y, got {x.shape[0]} and {y.shape[0]}")

    kernel_spec = spec.kernel_spec
    if bandwidths is None:
        kernel = kernel_spec.resolve(x, y)
    else:
        kernel = kernel_spec.with_bandwidths(jnp.asarray(bandwidths, jnp.result_type(x.dtype, y.dtype)))
    out: dict[str, jax.Array] = {}
    if kernel.num_bandwidths == 1:
        out["bandwidth"] = kernel.bandwidths[0]
    else:
        out.update({f"bandwidth_{i}": kernel.bandwidths[i] for i in range(kernel.num_bandwidths)})

    exact_kwargs = dict(tile=spec.tile, mesh=mesh, data_axis=data_axis, draws_per_pass=spec.draws_per_pass)
    exact_requested = [e for e in spec.estimators if e in EXACT_ESTIMATORS]
    if exact_requested:
        if spec.permutations > 0:
            test_key = jax.random.fold_in(key, 1)
            for i, method in enumerate(spec.tests):
                stats = _exact.relabelled_statistics(
                    x, y, kernel, key=jax.random.fold_in(test_key, i), num_draws=spec.permutations, method=method,
                    **exact_kwargs,
                )
                for estimator in exact_requested:
                    values = getattr(stats, estimator)
                    out[f"mmd2_{estimator}"] = values[0]
                    out[f"p_value_{estimator}_{method}"] = _exact.permutation_p_value(values)
        else:
            stats = _exact.relabelled_statistics(x, y, kernel, **exact_kwargs)
            for estimator in exact_requested:
                out[f"mmd2_{estimator}"] = getattr(stats, estimator)[0]

    if "linear" in spec.estimators:
        linear = mmd.mmd2_linear(x, y, kernel)
        out["mmd2_linear"] = linear.mmd2
        out["p_value_linear"] = linear.p_value

    if "rff" in spec.estimators:
        rff = mmd.mmd2_rff(x, y, kernel, key=jax.random.fold_in(key, 0), num_features=spec.rff_features)
        out["mmd2_rff"] = rff.unbiased

    if spec.cka:
        out["cka_linear"] = cka.linear_cka(x, y)
    if spec.cka_minibatch_size is not None:
        out["cka_minibatch"] = cka.minibatch_cka(x, y, spec.cka_minibatch_size)
    return out
