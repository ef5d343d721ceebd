"""Data-parallel and FSDP scaling is a layout change only: 1, 2 and 4 fake CPU devices give the same losses.

`test_sharding.py` covers 8 devices (data=8, and data=2 x fsdp=4) against one; this covers 2 devices (data=2) and
4 devices as FSDP together with data parallelism (data=2 x fsdp=2), over two steps (the second sees non-zero Adam
moments).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import smoke_config
from transfer_jax.tasks.registry import get_task
from transfer_jax.train.mesh import batch_sharding, create_mesh, global_batch
from transfer_jax.train.optim import make_optimizer
from transfer_jax.train.state import init_state, model_graph
from transfer_jax.train.step import make_train_step

pytestmark = pytest.mark.slow  # compiles the training step for 1, 2 and 4 devices in every test


def _batch():
    rng = np.random.default_rng(1)
    return {
        "image": rng.normal(size=(8, 16, 32, 32, 3)).astype(np.float32),
        "label": rng.integers(0, 3, size=(8, 16, 32, 32)).astype(np.int32),
    }


def _run(data: int, fsdp: int, strategy: str, steps: int = 2):
    config = smoke_config()
    task = get_task(config)
    mesh = create_mesh(data, fsdp, devices=jax.devices()[:data * fsdp])
    _, abstract_params, _ = model_graph(task.build_model)
    tx, schedule, _ = make_optimizer(config.optimizer, abstract_params, total_steps=10, backbone_layer_id=None,
                                     num_backbone_layers=0, is_backbone=lambda n: n.startswith("encoder."))
    state, graph, shardings = init_state(task.build_model, tx, jax.random.key(0), mesh, strategy, min_size=64)
    step = jax.jit(make_train_step(graph, task, tx, schedule, jnp.float32),
                   in_shardings=(shardings, batch_sharding(mesh)), out_shardings=(shardings, None),
                   donate_argnums=(0,))
    batch = global_batch(_batch(), mesh)
    losses = []
    for _ in range(steps):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params), state


@functools.lru_cache(maxsize=1)
def _single():
    losses, params, _ = _run(1, 1, "replicate")
    return losses, params


# Kept to two layouts (each is a compile of its own): 2 devices data-parallel, and 4 devices as data=2 x fsdp=2.
# scripts/benchmark.py --scaling runs the full 1/2/4/8 x replicate/fsdp table.
@pytest.mark.parametrize("data,fsdp,strategy", [(2, 1, "replicate"), (2, 2, "fsdp")])
def test_same_losses_over_device_counts(data, fsdp, strategy):
    assert jax.device_count() >= data * fsdp
    ref_losses, ref_params = _single()
    losses, params, state = _run(data, fsdp, strategy)
    if strategy == "fsdp":
        specs = [leaf.sharding.spec for leaf in jax.tree.leaves(state.params)]
        assert any("fsdp" in tuple(s) for s in specs), "no parameter was actually sharded over fsdp"
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    flat = dict(jax.tree_util.tree_leaves_with_path(params))
    for path, value in jax.tree_util.tree_leaves_with_path(ref_params):
        np.testing.assert_allclose(flat[path], value, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
