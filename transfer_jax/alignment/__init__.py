"""Alignment between pretrained and fine-tuned features: MMD² estimators, significance tests and CKA.

Pure JAX (no dependency on the model, training or data code). Everything returns device arrays and can run
inside ``jit`` on batch-sharded features; see :func:`compute_alignment` for the one-call entry point and the
streaming estimators (:class:`ExactMMD`, :class:`LinearTimeMMD`, :class:`RandomFeatureMMD`,
:class:`MinibatchCKA`, :class:`LinearCKA`) for accumulating features across evaluation batches::

    mesh = jax.make_mesh((n_devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    exact, cka = ExactMMD(kernel=KernelSpec(bandwidth="median"), mesh=mesh), MinibatchCKA()
    states = (exact.init(dim=768, capacity_x=num_eval_cases), cka.init())

    @functools.partial(jax.jit, donate_argnums=0)
    def accumulate(states, before, after):  # (B, 768) features of the same inputs, sharded P("data", None)
        return exact.update(states[0], before, after), cka.update(states[1], before, after)

    @jax.jit
    def report(states, key):
        test = exact.test(states[0], key, num_draws=999, method="sign_flip")
        return {"mmd2_unbiased": test.mmd2_unbiased, "p_value": test.p_value_unbiased,
                "bandwidth": test.bandwidths[0], "cka_minibatch": cka.finalize(states[1])}
"""
from transfer_jax.alignment.api import AlignmentSpec, compute_alignment
from transfer_jax.alignment.cka import (
    LinearCKA,
    LinearCKAState,
    MinibatchCKA,
    MinibatchCKAState,
    linear_cka,
    minibatch_cka,
    unbiased_hsic,
)
from transfer_jax.alignment.kernels import (
    Kernel,
    KernelSpec,
    gaussian,
    laplace,
    median_heuristic,
    squared_distances,
)
from transfer_jax.alignment.mmd import (
    ExactMMD,
    ExactMMDResult,
    ExactMMDState,
    ExactMMDTestResult,
    LinearMMDResult,
    LinearMMDState,
    LinearTimeMMD,
    MMDEstimate,
    RandomFeatureMMD,
    RFFResult,
    RFFState,
    linear_h_statistics,
    mmd2_biased,
    mmd2_exact,
    mmd2_linear,
    mmd2_rff,
    mmd2_unbiased,
    resolve_kernel,
)
from transfer_jax.alignment.significance import (
    permutation_p_value,
    permutation_test,
    relabelling_test,
    sign_flip_test,
)

__all__ = [
    "AlignmentSpec",
    "ExactMMD",
    "ExactMMDResult",
    "ExactMMDState",
    "ExactMMDTestResult",
    "Kernel",
    "KernelSpec",
    "LinearCKA",
    "LinearCKAState",
    "LinearMMDResult",
    "LinearMMDState",
    "LinearTimeMMD",
    "MMDEstimate",
    "MinibatchCKA",
    "MinibatchCKAState",
    "RFFResult",
    "RFFState",
    "RandomFeatureMMD",
    "compute_alignment",
    "gaussian",
    "laplace",
    "linear_cka",
    "linear_h_statistics",
    "median_heuristic",
    "minibatch_cka",
    "mmd2_biased",
    "mmd2_exact",
    "mmd2_linear",
    "mmd2_rff",
    "mmd2_unbiased",
    "permutation_p_value",
    "permutation_test",
    "relabelling_test",
    "resolve_kernel",
    "sign_flip_test",
    "squared_distances",
    "unbiased_hsic",
]
