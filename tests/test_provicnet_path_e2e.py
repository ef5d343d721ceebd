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

from transfer_jax import predict
from transfer_jax.convert.__main__ import main as convert_main

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "provicnet_e2e")


@pytest.fixture(scope="module")
def prediction(tmp_path_factory):
    root = tmp_path_factory.mktemp("provicnet_e2e")
    artifact, output = root / "artifact", root / "predictions"
    assert convert_main(["provicnet", f"--checkpoint={FIXTURE}/adc.pth", f"--output={artifact}",
                         "--num_heads=2"]) == 0
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
