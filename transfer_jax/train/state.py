"""The train state as a pytree, and the model split into a static graph + arrays.

NNX modules are used for construction only; the hot path is functional: `graphdef` (static, closed over by the
jitted step) plus `params` (differentiated), `rest` (batch statistics, RNG counters) and the optimizer state.
Training and evaluation behaviours (DropPath, BatchNorm, auxiliary head) are two graphdefs over the same arrays.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
from flax import nnx

from transfer_jax.train.mesh import replicated, tree_shardings


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    rest: Any
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class ModelGraph:
    train: Any  # graphdef in training mode
    eval: Any  # graphdef in inference mode

    def merge(self, params, rest, *, training: bool) -> nnx.Module:
        return nnx.merge(self.train if training else self.eval, params, rest)


def split_model(model: nnx.Module):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, params, rest


def model_graph(build: Callable[[nnx.Rngs], nnx.Module]) -> tuple[ModelGraph, Any, Any]:
    """Graphdefs for both modes plus abstract params/rest, without allocating any weights."""
    abstract = nnx.eval_shape(lambda: build(nnx.Rngs(0)))
    abstract.train()
    train_def, params, rest = split_model(abstract)
    abstract.eval()
    # Evaluation takes no gradient: rematerialising there only costs, and nnx.remat cannot run under the
    # evaluator's per-row vmap (it writes the block's state back across trace levels).
    abstract.set_attributes(remat=False, raise_if_not_found=False)
    eval_def, _, _ = split_model(abstract)
    return ModelGraph(train=train_def, eval=eval_def), params, rest


def init_state(build, tx, key: jax.Array, mesh, strategy: str, min_size: int = 2 ** 12, *, abstract=None
               ) -> tuple[TrainState, ModelGraph, Any]:
    """Create params and optimizer state directly with their final shardings (no host copy of the weights).

    `abstract` is `model_graph(build)` when the caller already has it (it traces the whole model).
    """
    graph, abstract_params, abstract_rest = abstract if abstract is not None else model_graph(build)

    def init_model(key):
        params_key, dropout_key = jax.random.split(key)
        model = build(nnx.Rngs(params=params_key, dropout=dropout_key))
        model.train()
        _, params, rest = split_model(model)
        return params, rest

    shardings = (tree_shardings(abstract_params, mesh, strategy, min_size),
                 tree_shardings(abstract_rest, mesh, "replicate"))
    params, rest = jax.jit(init_model, out_shardings=shardings)(key)
    state = init_train_state(params, rest, tx, mesh, strategy, min_size)
    return state, graph, state_shardings(state, mesh, strategy, min_size)


def init_train_state(params, rest, tx, mesh, strategy: str, min_size: int = 2 ** 12) -> TrainState:
    opt_shardings = tree_shardings(jax.eval_shape(tx.init, params), mesh, strategy, min_size)
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), replicated(mesh))
    return TrainState(step=step, params=params, rest=rest, opt_state=opt_state)


def state_shardings(state: TrainState, mesh, strategy: str, min_size: int = 2 ** 12) -> TrainState:
    return TrainState(
        step=replicated(mesh),
        params=tree_shardings(state.params, mesh, strategy, min_size),
        rest=tree_shardings(state.rest, mesh, "replicate"),
        opt_state=tree_shardings(state.opt_state, mesh, strategy, min_size),
    )


def abstract_state(state: TrainState, shardings: TrainState) -> TrainState:
    """ShapeDtypeStructs carrying concrete shardings: the restore target for Orbax."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def count_params(params) -> int:
    return int(sum(x.size for x in jax.tree.leaves(params)))
