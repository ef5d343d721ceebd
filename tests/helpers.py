"""Small builders shared by the tests: NIfTI files, manifests, configs, fixture paths and command runs."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import threading
import time

import nibabel as nib
import numpy as np

from transfer_jax.data.manifest import Case, write_manifest
from transfer_jax.train.loop import Callback

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def fixture_path(model: str, name: str) -> str:
    """``tests/fixtures/<model>/<name>``: the tiny upstream checkpoints and their reference outputs."""
    return os.path.join(REPO, "tests", "fixtures", model, name)


def run_python(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python *args`` from the repository root, as a user runs it (one CPU device), output captured."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def write_nifti(path: str, array_ijk: np.ndarray, affine: np.ndarray | None = None, dtype=np.float32) -> str:
    affine = np.eye(4) if affine is None else affine
    image = nib.Nifti1Image(np.asarray(array_ijk).astype(dtype), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, path)
    return path


def sample_case(sample_dir: str, split: str = "val", case_id: str = "10503_1000512") -> Case:
    join = lambda name: os.path.join(sample_dir, f"sample_{name}.nii.gz")  # noqa: E731
    return Case(case_id=case_id, t2=join("t2"), adc=join("adc"), dwi=join("dwi"), split=split,
                gland_mask=join("mask"), lesion_mask=join("lesions"))


def load_config(name: str, arg: str | None = None):
    """configs/<name>.py loaded the way the command line does (by path)."""
    spec = importlib.util.spec_from_file_location(f"config_{name}", os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def config_for(name: str, arg: str | None, *, tensorboard: bool = False, **overrides):
    """configs/<name>.py:<arg> on one device with dotted-key overrides (`**{"optimizer.lr": 1e-3}`)."""
    config = load_config(name, arg)
    # One device keeps compile times low; the sharded paths have their own tests (test_sharding, multihost).
    config.mesh.num_devices = 1
    config.logging.tensorboard = tensorboard
    for key, value in overrides.items():
        target = config
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return config


def smoke_config(**overrides):
    """configs/seg.py:smoke with dotted-key overrides."""
    return config_for("seg", "smoke", tensorboard=True, **overrides)


def tiny_manifest(directory: str, num_cases: int = 4) -> str:
    """A small synthetic manifest (phantom cases) in `directory`."""
    from transfer_jax.data.phantom import PhantomConfig, generate_phantom_dataset

    return generate_phantom_dataset(directory, PhantomConfig(num_cases=num_cases, num_val=1, num_test=1))


def write_manifest_for(directory: str, cases: list[Case]) -> str:
    path = os.path.join(directory, "manifest.csv")
    write_manifest(path, cases)
    return path


def fixed_training_batch(config, total_steps: int):
    """Smallest real runs on the smoke phantom set: no augmentation and a batch of exactly its 3 training cases
    (one epoch per step, so every step sees the same samples and the logged training loss must go down)."""
    config.batch_size = 3
    config.eval_batch_size = 2
    config.total_steps = total_steps
    config.log_every = 1
    config.eval_every = total_steps
    config.checkpoint_every = total_steps
    config.data.augment.update(dict(zoom=0.0, translate=0.0, flip_axes=(), intensity_scale=0.0, intensity_shift=0.0))
    return config


class HardStop(RuntimeError):
    """The run was stopped by `StopAfterCheckpoint`."""


class StopAfterCheckpoint(Callback):
    """Stops a run hard once the checkpoint of `step` (or a later one) is on disk, as a preemption would."""

    def __init__(self, step: int):
        self.step = step

    def after_checkpoint(self, step, checkpointer):
        if step >= self.step:
            checkpointer.wait()
            raise HardStop(f"stopped hard after the checkpoint of step {step}")


class SlowInput(Callback):
    """Every training batch arrives `seconds` late, as from slow storage."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def batches(self, batches):
        for batch in batches:
            time.sleep(self.seconds)
            yield batch


class FakeClock:
    """A clock the test moves by hand. `watched()` returns once another thread (a device watcher recording when
    a step finished) has read it, so that the test knows which time was recorded."""

    def __init__(self):
        self.now = 0.0
        self._reads_elsewhere = threading.Semaphore(0)

    def __call__(self) -> float:
        if threading.current_thread() is not threading.main_thread():
            self._reads_elsewhere.release()
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def watched(self) -> None:
        assert self._reads_elsewhere.acquire(timeout=30), "no other thread read the clock"


class FakeStepOutputs:
    """A step's outputs as a device watcher sees them (`is_ready`, `block_until_ready`); the test finishes them."""

    def __init__(self):
        self._done = threading.Event()

    def finish(self) -> None:
        self._done.set()

    def is_ready(self) -> bool:
        return self._done.is_set()

    def block_until_ready(self):
        self._done.wait()
        return self
