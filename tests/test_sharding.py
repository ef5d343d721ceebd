"""One sharded train step over 8 fake CPU devices equals the single-device step (replicated and FSDP layouts)."""
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


def _one_step(config, mesh, strategy, batch):
    task = get_task(config)
    build = task.build_model
    _, abstract_params, _ = model_graph(build)
    tx, schedule, _ = make_optimizer(config.optimizer, abstract_params, total_steps=10, backbone_layer_id=None,
                                     num_backbone_layers=0, is_backbone=lambda n: n.startswith("encoder."))
    state, graph, shardings = init_state(build, tx, jax.random.key(0), mesh, strategy, min_size=64)
    step = jax.jit(make_train_step(graph, task, tx, schedule, jnp.float32),
                   in_shardings=(shardings, batch_sharding(mesh)), out_shardings=(shardings, None),
                   donate_argnums=(0,))
    for _ in range(2):  # two steps: the second one sees non-zero Adam moments
        state, metrics = step(state, global_batch(batch, mesh))
    return state, metrics


@pytest.mark.parametrize("layout", ["replicate", "fsdp"])
def test_sharded_step_matches_single_device(layout):
    assert jax.device_count() == 8
    config = smoke_config()
    config.model.backbone_options.drop_path_rate = 0.2  # exercise the dropout RNG under sharding too
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.normal(size=(8, 16, 32, 32, 3)).astype(np.float32),
        "label": rng.integers(0, 3, size=(8, 16, 32, 32)).astype(np.int32),
    }
    single, m1 = _one_step(config, create_mesh(1, 1, devices=jax.devices()[:1]), "replicate", batch)
    mesh = create_mesh(data=8, fsdp=1) if layout == "replicate" else create_mesh(data=2, fsdp=4)
    sharded, m8 = _one_step(config, mesh, layout, batch)

    if layout == "fsdp":
        specs = [leaf.sharding.spec for leaf in jax.tree.leaves(sharded.params)]
        assert any("fsdp" in tuple(s) for s in specs), "no parameter was actually sharded over fsdp"
    np.testing.assert_allclose(float(m8["loss"]), float(m1["loss"]), rtol=1e-5)
    flat1 = jax.tree_util.tree_leaves_with_path(jax.device_get(single.params))
    flat8 = dict(jax.tree_util.tree_leaves_with_path(jax.device_get(sharded.params)))
    for path, value in flat1:
        np.testing.assert_allclose(flat8[path], value, rtol=1e-4, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))


def test_bf16_compute_keeps_fp32_params():
    config = smoke_config()
    config.model.backbone_options.dtype = "bfloat16"
    rng = np.random.default_rng(1)
    batch = {
        "image": rng.normal(size=(2, 16, 32, 32, 3)).astype(np.float32),
        "label": rng.integers(0, 3, size=(2, 16, 32, 32)).astype(np.int32),
    }
    task = get_task(config)
    mesh = create_mesh(1, 1, devices=jax.devices()[:1])
    _, abstract_params, _ = model_graph(task.build_model)
    tx, schedule, _ = make_optimizer(config.optimizer, abstract_params, total_steps=10, backbone_layer_id=None,
                                     num_backbone_layers=0, is_backbone=lambda n: n.startswith("encoder."))
    state, graph, _ = init_state(task.build_model, tx, jax.random.key(0), mesh, "replicate")
    model = graph.merge(state.params, state.rest, training=True)
    outputs = task.forward(model, global_batch(batch, mesh), jnp.bfloat16)
    assert outputs.logits.dtype == jnp.bfloat16
    step = jax.jit(make_train_step(graph, task, tx, schedule, jnp.bfloat16))
    new_state, metrics = step(state, global_batch(batch, mesh))
    assert np.isfinite(float(metrics["loss"]))
    assert {leaf.dtype for leaf in jax.tree.leaves(new_state.params)} == {jnp.dtype(jnp.float32)}
