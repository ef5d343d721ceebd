"""Layer-by-layer parity of the Flax ProFound ports with PyTorch references (tests/fixtures/profound, written by
scripts/make_parity_fixtures.py). Checkpoints are read with the torch-free reader and converted with the real
converter; every compared array must agree to 1e-4 (absolute) at full fp32 matmul precision."""
import functools

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import fixture_path
from transfer_jax.convert.profound import convert_profound, instantiate
from transfer_jax.models.convnext import ConvNeXtConfig, ConvNeXtV2
from transfer_jax.models.profound_vit import mae_loss, patchify, sincos_pos_embed_3d, unpatchify

ATOL = 1e-4
VIT_OPTIONS = dict(num_heads=3)  # the tiny fixture ViT: width 24, 3 heads (not inferable from weights)


fixture = functools.partial(fixture_path, "profound")


def close(actual, expected, what):
    actual = np.asarray(actual, np.float32)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    np.testing.assert_allclose(actual, expected, rtol=0, atol=ATOL, err_msg=what)


@pytest.fixture(scope="module")
def image():
    # Upstream layout (N, C, D, H, W) -> channels-last.
    return jnp.asarray(np.load(fixture("inputs.npz"))["image"].transpose(0, 2, 3, 4, 1))


def load(name, **options):
    converted = convert_profound(fixture(name), **options)
    return instantiate(converted.model_name, converted.config, converted.state), converted


@nnx.jit
def conv_encoder_trace(encoder, image):
    """Stem output, every block output (by torch module name) and the encoder output, in one compiled call."""
    trace = {}
    x = image
    for s, (downsample, blocks) in enumerate(zip(encoder.downsample_layers, encoder.stages)):
        for layer in downsample:
            x = layer(x)
        if s == 0:
            trace["stem"] = x
        for b, block in enumerate(blocks):
            x = block(x)
            trace[f"block.stages.{s}.{b}"] = x
    return trace, encoder(image)


def check_conv_encoder(encoder, image, ref):
    """Stem, every block, every stage and the pooled feature against the torch hooks."""
    trace, out = conv_encoder_trace(encoder, image)
    for name, value in trace.items():
        if name in ref:
            close(value, ref[name], name)
    assert sum(k.startswith("block.") for k in ref.files) == sum(k.startswith("block.") for k in trace)
    for s, stage in enumerate(out.stages):
        close(stage, ref[f"stage{s + 1}"], f"stage{s + 1}")
    close(out.pooled, ref["pooled"], "pooled")


def test_conv_classifier_parity(image, highest_precision):
    model, converted = load("conv_classifier.pth.tar")
    ref = np.load(fixture("conv_classifier_ref.npz"))
    model.eval()
    check_conv_encoder(model.encoder, image, ref)
    close(model(image), ref["logits_eval"], "logits (eval: running statistics)")
    model.train()
    close(model(image), ref["logits_train"], "logits (train: batch statistics)")
    # Running statistics after one training forward: torch momentum 0.1, unbiased variance.
    close(model.head[1].mean[...], ref["bn_mean_after_train"], "BatchNorm1d running_mean")
    close(model.head[1].var[...], ref["bn_var_after_train"], "BatchNorm1d running_var")


def test_conv_upernet_parity(image, highest_precision):
    model, _ = load("conv_upernet.pth.tar")
    ref = np.load(fixture("conv_upernet_ref.npz"))
    model.eval()
    for i, level in enumerate(model.normed_hidden_states(image)):
        close(level, ref[f"normed_level{i}"], f"hidden_norm level {i}")
    out = model(image)
    assert out.aux_logits is None
    close(out.logits, ref["seg_eval"], "segmentation logits (eval)")
    model.train()
    out = model(image)
    close(out.logits, ref["seg_train"], "segmentation logits (train)")
    close(out.aux_logits, ref["aux_train"], "auxiliary logits (train)")


def test_fcmae_pretraining_checkpoint_parity(image, highest_precision):
    model, converted = load("conv_fcmae.pth")
    ref = np.load(fixture("conv_fcmae_ref.npz"))
    check_conv_encoder(model.encoder, image, ref)
    np.testing.assert_array_equal(model.encoder.norm.scale[...], 1.0)
    assert set(converted.report.initialised) == {"encoder.norm.scale", "encoder.norm.bias"}


def test_vit_encoder_parity(image, highest_precision):
    model, converted = load("vit_mae.pth", **VIT_OPTIONS)
    ref = np.load(fixture("vit_mae_ref.npz"))
    encoder = model.encoder
    close(encoder.pos_embed[...], ref["pos_embed"], "stored pos_embed")
    # The stored table is exactly upstream's (scrambled) sin-cos table for the grid.
    np.testing.assert_array_equal(sincos_pos_embed_3d(24, (4, 4, 4))[None], ref["pos_embed"])
    out = encoder(image)
    close(out.cls, ref["cls"], "cls (normed)")
    close(out.tokens, ref["tokens"], "tokens (normed)")
    assert len(out.hidden_states) == 4
    for i, hidden in enumerate(out.hidden_states):
        close(hidden, ref[f"block.{i}"], f"block {i} output")
    levels = encoder.hidden_states(image)
    assert len(levels) == len(encoder.config.out_indices)


def test_mae_forward_and_loss_parity(image, highest_precision):
    model, _ = load("vit_mae.pth", with_decoder=True, decoder_num_heads=2, **VIT_OPTIONS)
    ref = np.load(fixture("vit_mae_ref.npz"))
    out = model(image, noise=jnp.asarray(ref["noise"]))
    np.testing.assert_array_equal(np.asarray(out.ids_restore), ref["ids_restore"])
    np.testing.assert_array_equal(np.asarray(out.mask), ref["mask"])
    latent, _, _ = model.forward_encoder(image, jnp.asarray(ref["noise"]))
    close(latent, ref["latent"], "MAE latent (visible tokens, normed)")
    close(out.pred, ref["pred"], "MAE decoder prediction")
    close(out.loss, ref["loss"], "MAE loss")
    close(mae_loss(image, out.pred, out.mask, (4, 8, 8), norm_pix_loss=True), ref["loss_norm_pix"],
          "MAE loss with norm_pix_loss")


def test_vit_upernet_parity(image, highest_precision):
    model, _ = load("vit_upernet.pth", out_indices=(0, 1, 2, 3), **VIT_OPTIONS)
    ref = np.load(fixture("vit_upernet_ref.npz"))
    model.eval()
    levels = model.normed_hidden_states(image)
    for i, step in enumerate((4, 2, 1, 1)):
        close(levels[i][:, ::step, ::step, ::step], ref[f"adapter_level{i}_sub{step}"], f"adapter level {i}")
    out = model(image)
    close(out.logits, ref["seg_eval"], "ViT UPerNet logits (eval)")
    model.train()
    out = model(image)
    close(out.logits[:, ::2, ::2, ::2], ref["seg_train_sub2"], "ViT UPerNet logits (train)")
    close(out.aux_logits[:, ::2, ::2, ::2], ref["aux_train_sub2"], "ViT UPerNet aux logits (train)")
    close(model.adapter.fpn1[1].mean[...], ref["fpn1_bn1_mean_after_train"], "adapter BatchNorm3d running_mean")
    close(model.adapter.fpn1[1].var[...], ref["fpn1_bn1_var_after_train"], "adapter BatchNorm3d running_var")


def test_vit_classifier_parity(image, highest_precision):
    model, _ = load("vit_classifier.pth.tar", **VIT_OPTIONS)
    ref = np.load(fixture("vit_classifier_ref.npz"))
    model.eval()
    close(model(image), ref["logits_eval"], "ViT classifier logits (eval)")
    model.train()
    close(model(image), ref["logits_train"], "ViT classifier logits (train)")


def test_sincos_table_encodes_upstreams_scrambled_grid():
    # Spec §4.1: for grid (4, 8, 8) token (d, h, w) gets h mod 4 in the first channel third, 2d + h // 4 in the
    # second and w in the third, each as [sin | cos] of pos / 10000^(2i / 256).
    table = sincos_pos_embed_3d(768, (4, 8, 8))
    assert table.shape == (257, 768) and table.dtype == np.float32
    np.testing.assert_array_equal(table[0], 0.0)
    omega = 1.0 / 10000 ** (np.arange(128) / 128.0)

    def encode(pos):
        return np.concatenate([np.sin(pos * omega), np.cos(pos * omega)])

    for d, h, w in [(0, 0, 0), (1, 5, 2), (3, 7, 7), (2, 3, 6)]:
        row = table[1 + d * 64 + h * 8 + w]
        expected = np.concatenate([encode(h % 4), encode(2 * d + h // 4), encode(w)])
        np.testing.assert_allclose(row, expected, atol=1e-6)


def test_patchify_is_channel_fastest_and_inverts():
    images = np.random.default_rng(0).normal(size=(2, 8, 16, 16, 3)).astype(np.float32)
    patches = np.asarray(patchify(images, (4, 8, 8)))
    assert patches.shape == (2, 2 * 2 * 2, 4 * 8 * 8 * 3)
    # Patch 3 = grid position (0, 1, 1); inside it, value index ((pd * 8 + ph) * 8 + pw) * 3 + c.
    pd, ph, pw, c = 1, 2, 5, 2
    assert patches[1, 3, ((pd * 8 + ph) * 8 + pw) * 3 + c] == images[1, pd, 8 + ph, 8 + pw, c]
    np.testing.assert_array_equal(np.asarray(unpatchify(patches, (4, 8, 8), (2, 2, 2), 3)), images)


def test_tiny_convnext_has_upstreams_parameter_count():
    # Spec §2.1: the ProFound-Conv (ConvNeXt-V2 Tiny, last downsample 1x1x1) encoder has 29,311,680 parameters.
    abstract = nnx.eval_shape(lambda: ConvNeXtV2(ConvNeXtConfig(), rngs=nnx.Rngs(0)))
    count = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
    assert count == 29_311_680
