"""End to end: a ProViCNet release checkpoint (.pth) -> convert -> `predict --params` on a NIfTI case gives the class
probabilities of upstream's own inference path on that case.

The fixture (scripts/make_provicnet_e2e_fixture.py, run with upstream pimed/ProViCNet + dinov2 code in a torch
venv) holds a six-slice cut of the repository's sample case, a small random `ProViCNet_contrastive` saved in the
release's state-dict layout (the ADC model: the ADC map has many zero voxels) and upstream's softmax on that case.
"""
import os

import nibabel as nib
import numpy as np
import pytest

from transfer_jax import extract, predict
from transfer_jax.convert.__main__ import main as convert_main
from transfer_jax.features.provicnet import softmax

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "provicnet_e2e")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    path = tmp_path_factory.mktemp("provicnet_e2e") / "artifact"
    assert convert_main(["provicnet", f"--checkpoint={FIXTURE}/adc.pth", f"--output={path}", "--num_heads=2"]) == 0
    return path


@pytest.fixture(scope="module")
def prediction(artifact):
    output = artifact.parent / "predictions"
    predict.main([f"--params={artifact}", f"--manifest={FIXTURE}/manifest.csv", f"--output={output}",
                  "--sequence=adc", "--save-probabilities"])
    return output


def test_probabilities_match_upstream_inference(prediction, highest_precision):
    reference = np.load(os.path.join(FIXTURE, "reference.npz"))
    written = nib.load(prediction / "sample_probabilities.nii.gz")
    t2 = nib.load(os.path.join(FIXTURE, "case_t2.nii.gz"))
    assert written.shape == t2.shape + (4,) and written.get_data_dtype() == np.float32
    np.testing.assert_allclose(written.affine, t2.affine, atol=1e-6)
    probabilities = np.asarray(written.dataobj).transpose(2, 1, 0, 3)  # [Z, Y, X, classes], upstream's array order
    stride = int(reference["stride"])
    np.testing.assert_allclose(probabilities[:, ::stride, ::stride], reference["probabilities"], atol=1e-4)
    np.testing.assert_allclose(probabilities.mean(axis=(1, 2)), reference["slice_means"], atol=1e-5)


def test_labels_are_the_argmax_on_the_t2_grid(prediction):
    labels = nib.load(prediction / "sample_seg.nii.gz")
    probabilities = np.asarray(nib.load(prediction / "sample_probabilities.nii.gz").dataobj)
    assert labels.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(labels.dataobj), probabilities.argmax(axis=-1))


def test_extract_from_the_manifest_uses_the_same_path(artifact, tmp_path, highest_precision):
    output = tmp_path / "features.npz"
    assert extract.main(["--model=provicnet", f"--params={artifact}", f"--manifest={FIXTURE}/manifest.csv",
                         "--sequence=adc", f"--output={output}"]) == 0
    reference = np.load(os.path.join(FIXTURE, "reference.npz"))
    features = np.load(output)
    np.testing.assert_array_equal(features["slice_position"], reference["positions"])
    np.testing.assert_array_equal(features["case_id"], ["sample"] * len(reference["positions"]))
    stride = int(reference["stride"])
    probabilities = softmax(features["seg_logits"])[:, ::stride, ::stride]
    np.testing.assert_allclose(probabilities, reference["probabilities"], atol=1e-4)
