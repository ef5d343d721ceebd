"""`backbone_options.remat` and `remat_policy`: every backbone's fine-tuning loss and gradients are unchanged by
rematerialisation under each policy, and both options reach the model from the seg config of each backbone."""
from __future__ import annotations

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from transfer_jax.data.phantom import random_crop_batch
from transfer_jax.models.layers import REMAT_POLICIES
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


def policies_traced(task, model, batch) -> list:
    """The policy of every rematerialised call in the traced forward pass (sub-jaxprs included)."""
    graphdef, state = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda state: task.forward(nnx.merge(graphdef, state), batch, jnp.float32))(state)
    found = []

    def visit(jaxpr):
        for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
            if "policy" in eqn.params and "prevent_cse" in eqn.params:  # jax.checkpoint's primitive
                found.append(eqn.params["policy"])
            for sub in jex.jaxprs_in_params(eqn.params):
                visit(sub)

    visit(jaxpr.jaxpr)
    return found


def loss_and_gradients(arg: str, remat: bool, policy: str = "nothing_saveable"):
    """Loss and parameter gradients of one eager fine-tuning forward on a fixed two-case batch."""
    config = load_config("seg", arg)
    config.model.backbone_options.remat = remat
    config.model.backbone_options.remat_policy = policy
    if "drop_path_rate" in config.model.backbone_options:  # one forward each: no random masks to replay
        config.model.backbone_options.drop_path_rate = 0.0
    task = get_task(config)
    model = task.build_model(nnx.Rngs(0))
    assert remat_flag(model) is remat
    batch = two_case_batch(config, task)
    if remat and policy != "nothing_saveable":  # equal gradients alone would not show the policy is used
        traced = policies_traced(task, model, batch)
        assert traced and all(p is REMAT_POLICIES[policy] for p in traced), traced

    def loss_fn(model):
        return task.loss(task.forward(model, batch, jnp.float32), batch)[0]

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    return float(loss), jax.tree.leaves(nnx.to_pure_dict(grads))


@pytest.mark.parametrize("arg", ["smoke", "profound_vit,smoke", "provicnet,smoke"])
def test_remat_keeps_loss_and_gradients(arg):
    plain, leaves = loss_and_gradients(arg, remat=False)
    assert len(leaves) > 0
    # The default and the policy that differs most from it (eager remat is slow: each is a full fwd + bwd).
    for policy in ("nothing_saveable", "dots_with_no_batch_dims_saveable"):
        remat, remat_leaves = loss_and_gradients(arg, remat=True, policy=policy)
        np.testing.assert_allclose(remat, plain, rtol=1e-6, err_msg=policy)
        assert len(remat_leaves) == len(leaves)
        for a, b in zip(leaves, remat_leaves):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6, err_msg=policy)


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


@pytest.mark.parametrize("arg", ["smoke", "profound_vit,smoke", "provicnet,smoke"])
def test_unknown_remat_policy_fails_when_the_model_is_built(arg):
    config = load_config("seg", arg)
    config.model.backbone_options.remat = True
    config.model.backbone_options.remat_policy = "dots_savable"
    with pytest.raises(ValueError, match=r"backbone_options\.remat_policy='dots_savable'.*dots_saveable"):
        get_task(config).build_model(nnx.Rngs(0))


@pytest.mark.parametrize("name,arg", [
    (name, arg) for name in ("seg", "cls", "sr", "distortion", "synthesis")
    for arg in ("smoke", "profound_vit,smoke", "provicnet,smoke")] + [
    ("pretrain_fcmae", "smoke"), ("pretrain_mae", "smoke"), ("pretrain_contrastive", "smoke")])
def test_every_preset_names_its_remat_policy(name, arg):
    """Set in every preset, so `--config.model.backbone_options.remat_policy=...` works from the command line."""
    options = load_config(name, arg).model.backbone_options
    assert options.remat is False and options.remat_policy == "nothing_saveable"
