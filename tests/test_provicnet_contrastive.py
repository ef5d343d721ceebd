"""Label-guided patch contrastive pair mining and loss (ProViCNet spec section 3.3)."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transfer_jax.data import slices
from transfer_jax.tasks import provicnet_contrastive as con


def brute_force_pairs(counts, upper=62, lower=2, distant=True):
    """Upstream's loop (generate_cancer_contrastive_pairs) with in-grid neighbours: sets of (anchor, other)."""
    n, gy, gx = counts.shape
    flat = lambda s, y, x: s * gy * gx + y * gx + x  # noqa: E731
    inside = lambda y, x: 0 <= y < gy and 0 <= x < gx  # noqa: E731
    positives, negatives = set(), set()
    for s, y, x in zip(*np.nonzero(counts >= upper)):
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                if (dy, dx) == (0, 0) or not inside(y + dy, x + dx):
                    continue
                if counts[s, y + dy, x + dx] >= upper:
                    positives.add((flat(s, y, x), flat(s, y + dy, x + dx)))
                if counts[s, y + dy, x + dx] <= lower:
                    step = 2 if distant else 1
                    ty, tx = y + step * dy, x + step * dx
                    if inside(ty, tx) and counts[s, ty, tx] <= lower:
                        negatives.add((flat(s, y, x), flat(s, ty, tx)))
    return positives, negatives


def synthetic_labels():
    """Two 64x64 slices (8x8 patch grid): a cancer blob with a partial edge, csPCa and indolent mixed."""
    labels = np.zeros((2, 64, 64), np.int32)
    labels[0, 16:40, 16:32] = 3
    labels[0, 16:40, 32:40] = 2  # indolent counts as cancer too
    labels[0, 40:41, 16:24] = 3  # 8 pixels in the block below: neither anchor nor normal
    labels[1, 0:16, 48:64] = 3  # touches the top/right border
    labels[1, 20:22, 0:8] = 1  # gland only: not cancer
    return labels


def test_patch_counts_sum_cancer_classes_per_block():
    counts = np.asarray(con.patch_cancer_counts(jnp.asarray(synthetic_labels())))
    assert counts.shape == (2, 8, 8)
    assert counts[0, 2, 2] == 64 and counts[0, 2, 4] == 64, "csPCa and indolent blocks are both full cancer"
    assert counts[0, 5, 2] == 8 and counts[1, 2, 0] == 0
    assert counts.sum() == (synthetic_labels() >= 2).sum()


@pytest.mark.parametrize("distant", [True, False])
def test_candidates_match_the_upstream_loop(distant):
    counts = np.asarray(con.patch_cancer_counts(jnp.asarray(synthetic_labels())))
    anchor, pos_other, pos_mask, neg_other, neg_mask = (
        np.asarray(a) for a in con.contrastive_candidates(jnp.asarray(counts), distant_negative=distant))
    positives = set(zip(anchor[pos_mask].tolist(), pos_other[pos_mask].tolist()))
    negatives = set(zip(anchor[neg_mask].tolist(), neg_other[neg_mask].tolist()))
    expected_pos, expected_neg = brute_force_pairs(counts, distant=distant)
    assert positives == expected_pos and len(positives) > 0
    assert negatives == expected_neg and len(negatives) > 0


def test_mining_is_balanced_valid_deterministic_and_jittable():
    labels = jnp.asarray(synthetic_labels())
    counts = np.asarray(con.patch_cancer_counts(labels))
    expected_pos, expected_neg = brute_force_pairs(counts)
    mine = jax.jit(functools.partial(con.mine_contrastive_pairs, max_pairs=5))
    pairs = mine(jax.random.key(0), labels)
    assert pairs.anchor.shape == (10,)
    take = min(len(expected_pos), len(expected_neg), 5)
    valid = np.asarray(pairs.valid)
    assert valid[:5].sum() == take and valid[5:].sum() == take
    chosen = list(zip(np.asarray(pairs.anchor).tolist(), np.asarray(pairs.other).tolist(), np.asarray(pairs.target)))
    for index, (a, o, t) in enumerate(chosen):
        if valid[index]:
            assert ((a, o) in expected_pos) if t > 0 else ((a, o) in expected_neg)
        else:
            assert t == 0
    assert len({c[:2] for c, v in zip(chosen, valid) if v}) == 2 * take, "drawn without replacement"
    again = mine(jax.random.key(0), labels)
    assert all(np.array_equal(a, b) for a, b in zip(pairs, again))
    draws = {tuple(np.asarray(mine(jax.random.key(k), labels).other).tolist()) for k in range(6)}
    assert len(draws) > 1, "different keys draw different pairs"
    # Unbalanced: fewer positives than max_pairs -> all positives used.
    many = con.mine_contrastive_pairs(jax.random.key(1), labels, max_pairs=200)
    assert int(many.valid[:200].sum()) == min(len(expected_pos), len(expected_neg))


def test_no_cancer_gives_no_pairs_and_zero_loss():
    labels = jnp.zeros((1, 64, 64), jnp.int32)
    pairs = con.mine_contrastive_pairs(jax.random.key(0), labels, max_pairs=4)
    assert not bool(pairs.valid.any())
    features = jnp.ones((1, 8, 8, 3))
    assert float(con.label_guided_contrastive_loss(lambda v: v, features, pairs)) == 0.0


def test_loss_values_on_hand_made_features():
    # Patch 0 = e1, patch 1 = e1 (identical: s = 1), patch 2 = e2 (orthogonal: s = 0), patch 3 = (e1 + e2)/sqrt2.
    features = jnp.asarray([[1.0, 0], [2.0, 0], [0, 1.0], [1.0, 1.0]]).reshape(1, 2, 2, 2)
    pairs = con.ContrastivePairs(
        anchor=jnp.asarray([0, 0, 0, 0, 0, 0]),
        other=jnp.asarray([1, 2, 1, 2, 3, 3]),
        target=jnp.asarray([1.0, 1.0, -1.0, -1.0, -1.0, 0.0]),
        valid=jnp.asarray([True, True, True, True, True, False]),
    )
    # positives: 1 - 1 = 0, 1 - 0 = 1; negatives: relu(1 - .5) = .5, relu(0 - .5) = 0, relu(.7071 - .5) = .2071.
    expected = (0 + 1 + 0.5 + 0 + (np.sqrt(0.5) - 0.5)) / 5
    loss = con.label_guided_contrastive_loss(lambda v: v, features, pairs)
    assert float(loss) == pytest.approx(expected, abs=1e-6)
    grads = jax.grad(lambda f: con.label_guided_contrastive_loss(lambda v: v * 3.0, f, pairs))(features)
    assert np.all(np.isfinite(np.asarray(grads)))


def test_sample_case_has_55_anchor_blocks(sample_dir):
    stack = slices.load_case_slices(
        os.path.join(sample_dir, "sample_t2.nii.gz"), os.path.join(sample_dir, "sample_mask.nii.gz"),
        os.path.join(sample_dir, "sample_lesions.nii.gz"))
    counts = con.patch_cancer_counts(jnp.asarray(stack.labels))
    assert counts.shape == (20, 32, 32)
    assert int((counts >= 62).sum()) == 55  # spec section 4
    pairs = con.mine_contrastive_pairs(jax.random.key(0), jnp.asarray(stack.labels))
    assert int(pairs.valid.sum()) > 0
