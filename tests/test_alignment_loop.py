"""The alignment probe inside the training loop: device-resident, scalars only, logged and summarised."""
import json
import os

import jax
import numpy as np
import pytest

from helpers import smoke_config
from transfer_jax.tasks.registry import get_task
from transfer_jax.train.loop import train_and_evaluate
from transfer_jax.train.mesh import create_mesh, replicated
from transfer_jax.train.optim import make_optimizer
from transfer_jax.train.probe import AlignmentProbe
from transfer_jax.train.state import init_state, model_graph


def test_probe_measurement_runs_without_any_transfer():
    config = smoke_config()
    task = get_task(config)
    mesh = create_mesh(data=8, fsdp=1)
    _, abstract_params, _ = model_graph(task.build_model)
    tx, _, _ = make_optimizer(config.optimizer, abstract_params, total_steps=4, backbone_layer_id=None,
                              num_backbone_layers=0, is_backbone=lambda n: n.startswith("encoder."))
    state, _, _ = init_state(task.build_model, tx, jax.random.key(0), mesh, "replicate")
    graph, _, _ = model_graph(task.build_model)
    images = np.random.default_rng(0).normal(size=(16, 16, 32, 32, 3)).astype(np.float32)
    probe = AlignmentProbe(config.alignment, task, graph, mesh, np.float32, images, batch_size=8)
    probe.set_reference(state.params, state.rest)
    shifted = jax.tree.map(lambda p: p * 1.5, state.params)
    key = jax.device_put(jax.random.key(3), replicated(mesh))
    probe(state.params, state.rest, key)  # compile outside the guard
    with jax.transfer_guard("disallow"):
        same = probe(state.params, state.rest, key)
        moved = probe(shifted, state.rest, key)
    for site in probe.sites:
        assert same[site]["mmd2_unbiased"].sharding.is_fully_replicated
    same, moved = jax.device_get((same, moved))
    for site in probe.sites:
        assert float(same[site]["cka_linear"]) > 0.999  # identical weights: identical features
        assert float(same[site]["mmd2_unbiased"]) < float(moved[site]["mmd2_unbiased"])
    assert float(moved["pooled"]["p_value_unbiased_permutation"]) < float(same["pooled"]["p_value_unbiased_permutation"])


@pytest.mark.slow
def test_training_loop_transfers_only_the_logged_scalars(tmp_path):
    config = smoke_config(**{"total_steps": 4, "eval_every": 2, "log_every": 2, "checkpoint_every": 4,
                             "logging.tensorboard": True})
    workdir = str(tmp_path / "run")
    # every device -> host copy outside the loop's explicit fetch points (logged scalars, eval statistics,
    # checkpoint writes) raises; feature arrays never leave the devices
    with jax.transfer_guard_device_to_host("disallow"):
        summary = train_and_evaluate(config, workdir)

    sites = list(config.alignment.sites)
    assert sorted(summary["alignment"]) == sorted(sites)
    for site in sites:
        entry = summary["alignment"][site]
        assert [step for step, _ in entry["trajectory"]] == [0, 2, 4]
        assert np.isfinite(entry["mmd2_unbiased"]) and 0.0 <= entry["p_value"] <= 1.0
        assert entry["trajectory"][0][1] < entry["trajectory"][-1][1]  # drift from the initial weights grows
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    logged = [r for r in records if "align/pooled/mmd2_unbiased" in r]
    assert [r["step"] for r in logged] == [0, 2, 4]
    assert summary["throughput"]["alignment_share"] < 1.0
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(os.path.join(workdir, "tensorboard")))
