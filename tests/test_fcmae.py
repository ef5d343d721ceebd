"""FCMAE: the dense emulation of the sparse masked ConvNeXt-V2 encoder, its decoder and loss."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from transfer_jax.models.convnext import ConvNeXtConfig, ConvNeXtV2
from transfer_jax.models.fcmae import FCMAE, FCMAEConfig, masked_stages, patch_mask
from transfer_jax.models.profound_vit import mae_loss

TINY = ConvNeXtConfig(depths=(1, 1, 1, 1), dims=(8, 16, 16, 32))
SHAPE = (16, 32, 32, 3)  # grid 1 x 2 x 2 with the total stride 16


def _images(n, seed=0):
    return jax.random.normal(jax.random.key(seed), (n, *SHAPE))


def _trained_grn(model):
    """GRN starts at zero (identity); give it weight so the tests exercise it."""
    for stage in model.encoder.stages if hasattr(model, "encoder") else model.stages:
        for block in stage:
            block.grn.gamma[...] = jax.random.normal(jax.random.key(5), block.grn.gamma.shape)
            block.grn.beta[...] = 0.1 * jax.random.normal(jax.random.key(6), block.grn.beta.shape)


def test_all_visible_single_sample_equals_the_dense_encoder():
    model = FCMAE(TINY, FCMAEConfig(mask_ratio=0.0, decoder_dim=16), rngs=nnx.Rngs(0))
    _trained_grn(model)
    images = _images(1)
    mask = model(images, key=jax.random.key(2)).mask
    np.testing.assert_array_equal(np.asarray(mask), np.zeros((1, 4)))
    with jax.default_matmul_precision("highest"):
        dense = model.encoder(images).stages
        masked = masked_stages(model.encoder, images, (1.0 - mask).reshape(1, 1, 2, 2))
    for a, b in zip(dense, masked):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5)


@pytest.mark.parametrize("policy", ["nothing_saveable", "dots_saveable"])
def test_remat_changes_neither_loss_nor_gradients(policy):
    images, noise = _images(1), jnp.asarray([[0.1, 0.9, 0.2, 0.8]])

    def loss_and_grads(remat):
        config = ConvNeXtConfig(depths=(1, 1, 1, 1), dims=(8, 16, 16, 32), remat=remat, remat_policy=policy)
        model = FCMAE(config, FCMAEConfig(mask_ratio=0.5, decoder_dim=16), rngs=nnx.Rngs(0))
        _trained_grn(model)
        return nnx.value_and_grad(lambda m: m(images, noise=noise).loss)(model)

    (plain, plain_grads), (remat, remat_grads) = loss_and_grads(False), loss_and_grads(True)
    np.testing.assert_allclose(float(remat), float(plain), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(plain_grads), jax.tree.leaves(remat_grads)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-7)


def test_hidden_voxels_do_not_reach_visible_sites():
    model = FCMAE(TINY, FCMAEConfig(mask_ratio=0.5, decoder_dim=16), rngs=nnx.Rngs(0))
    _trained_grn(model)
    images = _images(2)
    noise = jnp.asarray([[0.1, 0.9, 0.2, 0.8], [0.7, 0.3, 0.6, 0.05]])
    mask = np.asarray(patch_mask(noise, 0.5))  # sample 0 hides patches 1, 3; sample 1 hides 0, 2
    np.testing.assert_array_equal(mask, [[0, 1, 0, 1], [1, 0, 1, 0]])
    # overwrite the voxels of every hidden patch (grid 1 x 2 x 2 of 16^3 patches)
    changed = np.asarray(images).copy()
    for n in range(2):
        for patch in np.flatnonzero(mask[n]):
            h, w = divmod(patch, 2)
            changed[n, :, 16 * h:16 * h + 16, 16 * w:16 * w + 16] = 100.0
    visible = jnp.asarray(1.0 - mask).reshape(2, 1, 2, 2)
    first = masked_stages(model.encoder, images, visible)
    second = masked_stages(model.encoder, jnp.asarray(changed), visible)
    for a, b in zip(first, second):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(changed), noise=noise).pred),
                               np.asarray(model(images, noise=noise).pred), atol=1e-5)


def _numpy_pooled_grn(x, gamma, beta, visible):
    gx = np.sqrt((x.astype(np.float64) ** 2).sum(axis=(0, 1, 2, 3), keepdims=True))
    nx = gx / (gx.mean(axis=-1, keepdims=True) + 1e-6)
    return (gamma * (x * nx) + beta + x) * visible


def test_grn_is_pooled_over_the_batch():
    from transfer_jax.models.fcmae import pooled_grn

    encoder = ConvNeXtV2(TINY, rngs=nnx.Rngs(0))
    _trained_grn(encoder)
    grn = encoder.stages[0][0].grn
    rng = np.random.default_rng(0)
    visible = (rng.random((2, 4, 8, 8, 1)) < 0.5).astype(np.float32)
    x = rng.normal(size=(2, 4, 8, 8, grn.gamma.shape[0])).astype(np.float32) * visible
    out = pooled_grn(grn, jnp.asarray(x), jnp.asarray(visible))
    expected = _numpy_pooled_grn(x, np.asarray(grn.gamma[...]), np.asarray(grn.beta[...]), visible)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-6)
    # ...so a sample's features depend on its batch-mates, as upstream's sparse batch does
    images = _images(2)
    together = masked_stages(encoder, images, jnp.ones((2, 1, 2, 2)))[-1][0]
    alone = masked_stages(encoder, images[:1], jnp.ones((1, 1, 2, 2)))[-1][0]
    assert float(jnp.max(jnp.abs(together - alone))) > 1e-3


@pytest.mark.parametrize("norm_pix", [False, True])
def test_loss_is_the_masked_mean_of_per_patch_mse(norm_pix):
    model = FCMAE(TINY, FCMAEConfig(mask_ratio=0.5, decoder_dim=16, norm_pix_loss=norm_pix), rngs=nnx.Rngs(0))
    images = _images(2)
    out = model(images, key=jax.random.key(3))
    x = np.asarray(images, np.float64).reshape(2, 1, 16, 2, 16, 2, 16, 3).transpose(0, 1, 3, 5, 2, 4, 6, 7)
    target = x.reshape(2, 4, -1)
    if norm_pix:
        target = (target - target.mean(-1, keepdims=True)) / np.sqrt(target.var(-1, ddof=1, keepdims=True) + 1e-6)
    per_patch = ((np.asarray(out.pred, np.float64) - target) ** 2).mean(-1)
    mask = np.asarray(out.mask)
    assert mask.sum(axis=1).tolist() == [2, 2]
    np.testing.assert_allclose(float(out.loss), (per_patch * mask).sum() / mask.sum(), rtol=1e-5)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_loss_on_fixed_arrays_pools_masked_patches_over_the_batch(norm_pix):
    """Unequal hidden counts per sample tell the global masked mean (upstream) from a mean of per-sample means."""
    rng = np.random.default_rng(1)
    images = rng.normal(size=(2, 4, 8, 8, 2)).astype(np.float32)  # patch (2, 4, 4), grid 2 x 2 x 2
    pred = rng.normal(size=(2, 8, 2 * 4 * 4 * 2)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 1]], np.float32)
    patches = images.reshape(2, 2, 2, 2, 4, 2, 4, 2).transpose(0, 1, 3, 5, 2, 4, 6, 7).reshape(2, 8, -1)
    patches = patches.astype(np.float64)
    if norm_pix:
        patches = (patches - patches.mean(-1, keepdims=True)) / np.sqrt(patches.var(-1, ddof=1, keepdims=True) + 1e-6)
    per_patch = ((pred - patches) ** 2).mean(-1)
    expected = (per_patch * mask).sum() / mask.sum()
    loss = mae_loss(jnp.asarray(images), jnp.asarray(pred), jnp.asarray(mask), (2, 4, 4), norm_pix)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_optimisation_lowers_the_loss():
    model = FCMAE(TINY, FCMAEConfig(mask_ratio=0.5, decoder_dim=16), rngs=nnx.Rngs(0))
    images = _images(2)
    noise = jax.random.uniform(jax.random.key(1), (2, 4))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(3e-3)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state):
        def loss_fn(p):
            return nnx.merge(graphdef, p, rest)(images, noise=noise).loss

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for _ in range(6):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


def test_config_errors():
    with pytest.raises(ValueError, match="drop_path_rate"):
        FCMAE(ConvNeXtConfig(depths=(1, 1, 1, 1), dims=(8, 16, 16, 32), drop_path_rate=0.1), FCMAEConfig(),
              rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="mask_ratio"):
        FCMAEConfig(mask_ratio=1.0)
    model = FCMAE(TINY, FCMAEConfig(decoder_dim=16), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="multiples of the patch size"):
        model(jnp.zeros((1, 16, 32, 24, 3)), key=jax.random.key(0))
    with pytest.raises(ValueError, match="multiples of the patch size"):
        model(jnp.zeros((1, 16, 32, 32, 2)), key=jax.random.key(0))
