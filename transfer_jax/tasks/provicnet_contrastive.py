"""ProViCNet's label-guided patch contrastive loss as pure, jittable functions (spec section 3.3).

Upstream (``generate_cancer_contrastive_pairs`` + ``undersampling_cancer_contrastive_pairs`` + ``contrastive_loss``
in pimed/ProViCNet ``util_functions/train_functions.py``; ``train.py``: thresholds 62 / 2, ``max_pair`` 30,
``distant_negative=True``, ``contrastive_alpha`` 0.05):

1. Cancer count per ViT patch: the number of cancer pixels in each non-overlapping ``8 x 8`` block of the
   ``256 x 256`` label (one block = one of the ``32 x 32`` patch tokens). Cancer = classes 2 + 3 (indolent +
   csPCa). The repo root copy used by ``train.py`` sums both channels of the 4-channel label; the
   ``ProViCNet/util_functions`` copy counts channel 2 only, which finds no anchor on csPCa-only data.
2. Anchors: blocks with count ``>= upper`` (62 of 64).
3. Positives: the 8 neighbours of an anchor with count ``>= upper`` -> pair label +1.
4. Negatives: neighbours with count ``<= lower`` (2); with ``distant_negative`` the pair is made with the block
   one more step in the same direction (distance 2), kept if that block is also ``<= lower`` -> label -1.
5. Balance: ``k = min(#positives, #negatives, max_pairs)`` of each, drawn uniformly without replacement.
6. Loss over the selected pairs of final-norm patch vectors passed through ``CL_Head``: cosine similarity ``s``;
   positive ``1 - s``, negative ``max(0, s - margin)`` (margin 0.5); mean over pairs, 0 without pairs. The trainer
   combines ``(1 - alpha) * DiceCE + alpha * loss``.

Fixed shapes: pairs come as ``2 * max_pairs`` slots with a ``valid`` mask, so everything jits once. Deterministic
given the PRNG key (the upstream draws use Python's ``random``; the final shuffle is left out since the loss is a
mean). Border handling differs on purpose: upstream slices the 3x3 window with ``y - 1 : y + 2``, so anchors in
row or column 0 get no pairs at all, and distance-2 negatives near the top/left edge wrap around to the other side
(near the bottom/right they raise IndexError); here every neighbour inside the grid counts and nothing wraps.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

# Neighbour offsets (dy, dx) of the 3x3 window without the centre, row-major like upstream's torch.where order.
NEIGHBOUR_OFFSETS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0))


class ContrastivePairs(NamedTuple):
    """``2 * max_pairs`` pair slots; indices are flat patch indices ``n * gy * gx + y * gx + x``."""

    anchor: jax.Array  # [2P] int32
    other: jax.Array  # [2P] int32
    target: jax.Array  # [2P] float32: +1 positive, -1 negative, 0 in unused slots
    valid: jax.Array  # [2P] bool


def patch_cancer_counts(labels: jax.Array, patch_pixels: int = 8, cancer_classes: tuple[int, ...] = (2, 3)):
    """Class-index labels [N, H, W] -> cancer pixels per ``patch_pixels`` block [N, H / p, W / p] int32."""
    n, height, width = labels.shape
    if height % patch_pixels or width % patch_pixels:
        raise ValueError(f"label size {height}x{width} is not a multiple of the block size {patch_pixels}")
    cancer = jnp.isin(labels, jnp.asarray(cancer_classes)).astype(jnp.int32)
    blocks = cancer.reshape(n, height // patch_pixels, patch_pixels, width // patch_pixels, patch_pixels)
    return blocks.sum(axis=(2, 4))


def _shifted(counts: jax.Array, dy: int, dx: int, fill: int) -> jax.Array:
    """``out[n, y, x] = counts[n, y + dy, x + dx]``, ``fill`` outside the grid."""
    margin = max(abs(dy), abs(dx))
    padded = jnp.pad(counts, ((0, 0), (margin, margin), (margin, margin)), constant_values=fill)
    gy, gx = counts.shape[1:]
    return padded[:, margin + dy : margin + dy + gy, margin + dx : margin + dx + gx]


def contrastive_candidates(
    counts: jax.Array, *, upper: int = 62, lower: int = 2, distant_negative: bool = True
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """Every candidate pair, one slot per (neighbour offset, patch): five flat arrays of length ``8 * N * gy * gx``,
    ``(anchor_index, positive_other, positive_mask, negative_other, negative_mask)``; indices are flat patch
    indices, a slot is a candidate where its mask is set."""
    n, gy, gx = counts.shape
    too_many = jnp.iinfo(jnp.int32).max  # never <= lower
    anchor = counts >= upper
    nn, yy, xx = jnp.meshgrid(jnp.arange(n), jnp.arange(gy), jnp.arange(gx), indexing="ij")
    base = nn * gy * gx
    positive_other, positive_mask, negative_other, negative_mask = [], [], [], []
    for dy, dx in NEIGHBOUR_OFFSETS:
        positive_mask.append(anchor & (_shifted(counts, dy, dx, -1) >= upper))
        positive_other.append(base + (yy + dy) * gx + (xx + dx))
        near_normal = _shifted(counts, dy, dx, too_many) <= lower
        if distant_negative:
            step = 2
            near_normal &= _shifted(counts, 2 * dy, 2 * dx, too_many) <= lower
        else:
            step = 1
        negative_mask.append(anchor & near_normal)
        negative_other.append(base + (yy + step * dy) * gx + (xx + step * dx))
    anchor_index = jnp.broadcast_to(base + yy * gx + xx, (len(NEIGHBOUR_OFFSETS), n, gy, gx))
    return (anchor_index.reshape(-1), jnp.stack(positive_other).reshape(-1), jnp.stack(positive_mask).reshape(-1),
            jnp.stack(negative_other).reshape(-1), jnp.stack(negative_mask).reshape(-1))


def _sample(key: jax.Array, mask: jax.Array, count: int) -> jax.Array:
    """``count`` slot positions: a uniform draw without replacement among the set ``mask`` slots (top-k of random
    keys), ordered so the first ``min(count, mask.sum())`` are candidates."""
    scores = jnp.where(mask, jax.random.uniform(key, mask.shape), 2.0)
    _, positions = jax.lax.top_k(-scores, count)
    return positions


def mine_contrastive_pairs(
    key: jax.Array,
    labels: jax.Array,
    *,
    max_pairs: int = 30,
    upper: int = 62,
    lower: int = 2,
    distant_negative: bool = True,
    patch_pixels: int = 8,
    cancer_classes: tuple[int, ...] = (2, 3),
) -> ContrastivePairs:
    """Balanced positive / negative patch pairs from class-index labels [N, H, W] (see the module docstring).

    Slots ``0..P-1`` hold positives, ``P..2P-1`` negatives; the first ``k = min(#pos, #neg, max_pairs)`` of each
    half are valid. Jit with the keyword arguments static.
    """
    counts = patch_cancer_counts(labels, patch_pixels, cancer_classes)
    anchor, positive_other, positive_mask, negative_other, negative_mask = contrastive_candidates(
        counts, upper=upper, lower=lower, distant_negative=distant_negative
    )
    take = jnp.minimum(jnp.minimum(positive_mask.sum(), negative_mask.sum()), max_pairs)
    slots = min(max_pairs, anchor.shape[0])
    positive_key, negative_key = jax.random.split(key)
    positive_pick = _sample(positive_key, positive_mask, slots)
    negative_pick = _sample(negative_key, negative_mask, slots)
    used = jnp.arange(slots) < take
    pad = max_pairs - slots  # only when the grid has fewer candidate slots than max_pairs

    def half(values):
        return jnp.pad(values, (0, pad))

    valid = jnp.concatenate([half(used), half(used)])
    return ContrastivePairs(
        anchor=jnp.where(valid, jnp.concatenate([half(anchor[positive_pick]), half(anchor[negative_pick])]), 0)
        .astype(jnp.int32),
        other=jnp.where(valid, jnp.concatenate([half(positive_other[positive_pick]),
                                                half(negative_other[negative_pick])]), 0).astype(jnp.int32),
        target=jnp.where(valid, jnp.concatenate([jnp.ones(max_pairs), -jnp.ones(max_pairs)]), 0.0)
        .astype(jnp.float32),
        valid=valid,
    )


def cosine_similarity(a: jax.Array, b: jax.Array, eps: float = 1e-8) -> jax.Array:
    """``F.cosine_similarity`` along the last axis: ``a.b / sqrt(max(|a|^2 |b|^2, eps^2))``."""
    dot = jnp.sum(a * b, axis=-1)
    norms = jnp.sum(a * a, axis=-1) * jnp.sum(b * b, axis=-1)
    return dot / jnp.sqrt(jnp.maximum(norms, eps * eps))


def pair_loss(anchor: jax.Array, other: jax.Array, pairs: ContrastivePairs, margin: float = 0.5) -> jax.Array:
    """Mean over valid pairs of ``1 - s`` (positive) / ``relu(s - margin)`` (negative); 0 without pairs.

    ``anchor``, ``other``: projected vectors [2P, D] in the slot order of ``pairs``.
    """
    similarity = cosine_similarity(anchor, other)
    per_pair = jnp.where(pairs.target > 0, 1.0 - similarity, jax.nn.relu(similarity - margin))
    count = pairs.valid.sum()
    return jnp.where(count > 0, jnp.sum(jnp.where(pairs.valid, per_pair, 0.0)) / jnp.maximum(count, 1), 0.0)


def label_guided_contrastive_loss(
    project: Callable[[jax.Array], jax.Array], feature_map: jax.Array, pairs: ContrastivePairs, margin: float = 0.5
) -> jax.Array:
    """Contrastive term from the final-norm patch map [N, gy, gx, D] (``ProViCNet(..., return_features=True)``)
    and ``project`` = ``model.project`` (``CL_Head``). Unused slots gather patch 0 and are masked out."""
    vectors = feature_map.reshape(-1, feature_map.shape[-1])
    return pair_loss(project(vectors[pairs.anchor]), project(vectors[pairs.other]), pairs, margin)


def view_pairs(key: jax.Array, grid: tuple[int, int, int], *, max_pairs: int = 30, distance: int = 2
               ) -> ContrastivePairs:
    """Label-free pairs between two views of the same slices (the self-supervised variant).

    The patch vectors are those of view 1 (flat indices ``0 .. n*gy*gx - 1``) followed by view 2 (the same slices,
    other photometric augmentation). ``max_pairs`` anchors are drawn uniformly from view 1; each one's positive is
    the same patch in view 2 and its negative the view-2 patch ``distance`` steps away in a random one of the 8
    neighbour directions (the distant-negative rule of the label-guided loss); negatives that fall off the grid are
    unused slots. Jit with ``grid``, ``max_pairs`` and ``distance`` static.
    """
    n, gy, gx = grid
    per_view = n * gy * gx
    anchor_key, direction_key = jax.random.split(key)
    anchor = jax.random.randint(anchor_key, (max_pairs,), 0, per_view)
    offsets = jnp.asarray(NEIGHBOUR_OFFSETS, jnp.int32)[jax.random.randint(direction_key, (max_pairs,), 0, 8)]
    slice_index, y, x = anchor // (gy * gx), (anchor // gx) % gy, anchor % gx
    ny, nx = y + distance * offsets[:, 0], x + distance * offsets[:, 1]
    inside = (ny >= 0) & (ny < gy) & (nx >= 0) & (nx < gx)
    negative = per_view + slice_index * gy * gx + jnp.clip(ny, 0, gy - 1) * gx + jnp.clip(nx, 0, gx - 1)
    valid = jnp.concatenate([jnp.ones(max_pairs, bool), inside])
    return ContrastivePairs(
        anchor=jnp.concatenate([anchor, anchor]).astype(jnp.int32),
        other=jnp.where(valid, jnp.concatenate([anchor + per_view, negative]), 0).astype(jnp.int32),
        target=jnp.where(valid, jnp.concatenate([jnp.ones(max_pairs), -jnp.ones(max_pairs)]), 0.0)
        .astype(jnp.float32),
        valid=valid,
    )
