"""Classification head and encoder+head wrapper (upstream `models/classifier.py::Classifier`).

Upstream builds `head = Sequential(Linear(C, 256), BatchNorm1d(256), ReLU(), Linear(256, K))` on the encoder's
first output (ConvNeXt: the normed pooled feature; ViT: the normed cls token). `ClassifierHead` is an `nnx.List`
with the same four entries, so its state paths are `head.0.kernel`, `head.1.{scale,bias,mean,var}`,
`head.3.kernel`: the PyTorch indices, and the converter's key table is a rename.

`TorchBatchNorm` reproduces `torch.nn.BatchNorm{1,3}d` exactly (it is also used by the ViT UPerNet adapter):
normalisation with the biased batch variance in training and the running statistics in eval, and running
statistics updated with the *unbiased* batch variance (flax's `nnx.BatchNorm` uses the biased one). `momentum`
follows the flax convention (0.9 keeps 90 % of the old value = torch momentum 0.1). Eval mode is switched by
`model.eval()` (it sets `use_running_average=True`), train mode by `model.train()`.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["TorchBatchNorm", "Activation", "ClassifierHead", "Classifier", "torch_linear"]


def _torch_uniform(fan_in: int) -> nnx.Initializer:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's default init of Linear/Conv weights (kaiming a=sqrt(5)) and
    biases."""
    bound = 1.0 / math.sqrt(max(fan_in, 1))

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def torch_linear(in_features: int, out_features: int, *, dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.Linear:
    """nnx.Linear initialised like a fresh `torch.nn.Linear` (weights and bias uniform in +-1/sqrt(in))."""
    return nnx.Linear(
        in_features, out_features, kernel_init=_torch_uniform(in_features), bias_init=_torch_uniform(in_features),
        dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
    )


class TorchBatchNorm(nnx.Module):
    """BatchNorm over every axis but the last (channels-last), with PyTorch's statistics semantics.

    Params `scale`/`bias` (torch `weight`/`bias`), batch statistics `mean`/`var` (torch `running_mean`/
    `running_var`); torch's `num_batches_tracked` is not needed (momentum is fixed).
    """

    def __init__(self, num_features: int, *, momentum: float = 0.9, epsilon: float = 1e-5, dtype=jnp.float32):
        self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        self.use_running_average = False

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        if self.use_running_average:
            mean, var = self.mean[...], self.var[...]
        else:
            axes = tuple(range(x.ndim - 1))
            count = math.prod(x.shape[:-1])
            mean = jnp.mean(x32, axis=axes)
            var = jnp.mean(jnp.square(x32 - mean), axis=axes)
            unbiased = var * (count / max(count - 1, 1))
            self.mean[...] = self.momentum * self.mean[...] + (1.0 - self.momentum) * mean
            self.var[...] = self.momentum * self.var[...] + (1.0 - self.momentum) * unbiased
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
        return (y * self.scale[...] + self.bias[...]).astype(self.dtype)


class Activation(nnx.Module):
    """A parameter-free layer, so activations can sit at their PyTorch index inside an `nnx.List`."""

    def __init__(self, fn: Callable[[jax.Array], jax.Array]):
        self.fn = fn

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fn(x)


class ClassifierHead(nnx.List):
    """Linear(in -> bottleneck) -> TorchBatchNorm -> ReLU -> Linear(bottleneck -> classes); indices as upstream."""

    def __init__(self, in_features: int, num_classes: int, *, bottleneck_dim: int = 256, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        super().__init__([
            torch_linear(in_features, bottleneck_dim, dtype=dtype, rngs=rngs),
            TorchBatchNorm(bottleneck_dim, dtype=dtype),
            Activation(jax.nn.relu),
            torch_linear(bottleneck_dim, num_classes, dtype=dtype, rngs=rngs),
        ])

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self:
            x = layer(x)
        return x


class Classifier(nnx.Module):
    """`encoder` then `head`; state paths `encoder.*` + `head.*` as in the upstream fine-tuned checkpoints.

    The head reads element 0 of the encoder output when it is a tuple (ConvNeXt `EncoderOutput.pooled`, ViT
    `ViTOutput.cls`), exactly like upstream. Returns logits (N, K).
    """

    def __init__(self, encoder: nnx.Module, head: ClassifierHead):
        self.encoder = encoder
        self.head = head

    def __call__(self, x: jax.Array) -> jax.Array:
        features = self.encoder(x)
        if isinstance(features, tuple):
            features = features[0]
        return self.head(features)
