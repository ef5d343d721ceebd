"""`backbone_options.remat`: every backbone's fine-tuning loss and gradients are unchanged by rematerialisation,
and the option reaches the model from the seg config of each backbone."""
from __future__ import annotations

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from transfer_jax.tasks.registry import get_task

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def seg_config(arg: str):
    spec = importlib.util.spec_from_file_location("seg_config_for_remat", os.path.join(REPO, "configs", "seg.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def random_batch(config, task, seed=0):
    rng = np.random.default_rng(seed)
    crop = tuple(config.data.crop_size)
    gland = np.zeros(crop, np.uint8)
    gland[tuple(slice(c // 4, c - c // 4) for c in crop)] = 1
    lesion = np.zeros(crop, np.uint8)
    lesion[tuple(slice(c // 3, c // 2 + 1) for c in crop)] = 1
    samples = [task.make_sample({"image": rng.normal(size=(*crop, len(config.data.channels))).astype(np.float32),
                                 "gland": gland, "lesion": lesion}) for _ in range(2)]
    return {k: jnp.asarray(np.stack([s[k] for s in samples])) for k in samples[0]}


def remat_flag(model) -> bool:
    encoder = getattr(model, "encoder", model)  # UPerNet wraps the conv / ViT encoder; ProViCNet is the model
    return encoder.config.remat


@pytest.mark.parametrize("arg", ["smoke", "profound_vit,smoke", "provicnet,smoke"])
def test_remat_keeps_loss_and_gradients(arg):
    results = []
    for remat in (False, True):
        config = seg_config(arg)
        config.model.backbone_options.remat = remat
        if "drop_path_rate" in config.model.backbone_options:  # one forward each: no random masks to replay
            config.model.backbone_options.drop_path_rate = 0.0
        task = get_task(config)
        model = task.build_model(nnx.Rngs(0))
        assert remat_flag(model) is remat
        batch = random_batch(config, task)

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
