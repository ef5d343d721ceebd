"""`backbone_options.remat`: every backbone's fine-tuning loss and gradients are unchanged by rematerialisation,
and the option reaches the model from the seg config of each backbone."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from transfer_jax.data.phantom import random_crop_batch
from transfer_jax.tasks.registry import get_task
from transfer_jax.train.state import model_graph, split_model
from transfer_jax.train.step import make_eval_step

from helpers import load_config


def two_case_batch(config, task) -> dict[str, jax.Array]:
    batch = random_crop_batch(task.make_sample, config.data.crop_size, len(config.data.channels), 2)
    return {k: jnp.asarray(v) for k, v in batch.items()}


def remat_flag(model) -> bool:
    encoder = getattr(model, "encoder", model)  # UPerNet wraps the conv / ViT encoder; ProViCNet is the model
    return encoder.remat


@pytest.mark.parametrize("arg", ["smoke", "profound_vit,smoke", "provicnet,smoke"])
def test_remat_keeps_loss_and_gradients(arg):
    results = []
    for remat in (False, True):
        config = load_config("seg", arg)
        config.model.backbone_options.remat = remat
        if "drop_path_rate" in config.model.backbone_options:  # one forward each: no random masks to replay
            config.model.backbone_options.drop_path_rate = 0.0
        task = get_task(config)
        model = task.build_model(nnx.Rngs(0))
        assert remat_flag(model) is remat
        batch = two_case_batch(config, task)

        def loss_fn(model):
            return task.loss(task.forward(model, batch, jnp.float32), batch)[0]

        results.append(nnx.value_and_grad(loss_fn)(model))
    (plain, plain_grads), (remat, remat_grads) = results
    np.testing.assert_allclose(float(remat), float(plain), rtol=1e-6)
    leaves, remat_leaves = jax.tree.leaves(nnx.to_pure_dict(plain_grads)), jax.tree.leaves(
        nnx.to_pure_dict(remat_grads))
    assert len(leaves) == len(remat_leaves) > 0
    for a, b in zip(leaves, remat_leaves):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arg", ["smoke", "profound_vit,smoke", "provicnet,smoke"])
def test_evaluation_graph_runs_without_remat(arg):
    """The evaluator vmaps the model per row, where nnx.remat cannot run; its graph has remat off."""
    config = load_config("seg", arg)
    config.model.backbone_options.remat = True
    task = get_task(config)
    graph, _, _ = model_graph(task.build_model)
    _, params, rest = split_model(task.build_model(nnx.Rngs(0)))
    assert remat_flag(graph.merge(params, rest, training=True)) is True
    assert remat_flag(graph.merge(params, rest, training=False)) is False
    batch = two_case_batch(config, task)
    _, losses = jax.jit(make_eval_step(graph, task, jnp.float32))(params, rest, batch)
    assert losses.shape == (2,) and bool(jnp.all(jnp.isfinite(losses)))
