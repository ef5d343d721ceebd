"""The jitted train and eval steps: pure functions of (state, batch), compiled once, state donated."""
from __future__ import annotations

from typing import Any

import jax
import optax
from flax import nnx

from transfer_jax.train.mesh import batch_sharding
from transfer_jax.train.state import ModelGraph, TrainState


def make_train_step(graph: ModelGraph, task, tx: optax.GradientTransformation, schedule, compute_dtype):
    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        def loss_fn(params, rest):
            model = graph.merge(params, rest, training=True)
            return task.loss(task.forward(model, batch, compute_dtype), batch)

        rest = state.rest
        # Tree-mode NNX grad: differentiates params only and writes the forward pass's state updates (DropPath
        # RNG counters, BatchNorm running statistics) back into `rest`, which plain jax.grad cannot do.
        (loss, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True, graph=False)(state.params, rest)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads), lr=schedule(state.step))
        return TrainState(step=state.step + 1, params=params, rest=rest, opt_state=opt_state), metrics

    return train_step


def make_eval_step(graph: ModelGraph, task, compute_dtype):
    """(params, rest, batch) -> (per-row statistics, per-row loss).

    Each row is its own batch of one under `jax.vmap` (XLA folds the vmapped axis back into the batch axis), so
    the loss is per case and the evaluator can leave the padding rows of the last batch out of its mean.
    """
    def eval_step(params: Any, rest: Any, batch: dict[str, jax.Array]):
        model = graph.merge(params, rest, training=False)

        def one_row(row):
            row = jax.tree.map(lambda x: x[None], row)
            outputs = task.forward(model, row, compute_dtype)
            loss, _ = task.loss(outputs, row)
            return jax.tree.map(lambda x: x[0], task.eval_stats(outputs, row)), loss

        return jax.vmap(one_row)(batch)

    return eval_step


def jit_train_step(train_step, shardings, mesh):
    """`train_step` jitted as a run compiles it: the state keeps `shardings` (a `TrainState` of shardings) in and
    out and is donated, the batch is split over the mesh's batch axes, the metrics are left to XLA."""
    return jax.jit(train_step, in_shardings=(shardings, batch_sharding(mesh)), out_shardings=(shardings, None),
                   donate_argnums=(0,))


def describe_memory(compiled) -> dict[str, float]:
    """Per-device MiB from XLA's memory analysis (arguments, outputs, temporaries, aliased donations)."""
    try:
        analysis = compiled.memory_analysis()
    except Exception:  # some backends do not implement it
        return {}
    if analysis is None:
        return {}
    mib = 1024.0 * 1024.0
    fields = {
        "argument_mib": "argument_size_in_bytes", "output_mib": "output_size_in_bytes",
        "temp_mib": "temp_size_in_bytes", "alias_mib": "alias_size_in_bytes",
        "generated_code_mib": "generated_code_size_in_bytes",
    }
    return {k: getattr(analysis, v, 0) / mib for k, v in fields.items()}


def compiled_flops(compiled) -> float:
    """XLA's FLOP count for one step on one device (0 when unavailable)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:
        return 0.0
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))
