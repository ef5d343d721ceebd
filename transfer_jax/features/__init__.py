"""Feature extraction from converted artifacts (the logic behind ``python -m transfer_jax.extract``).

* :mod:`transfer_jax.features.profound` -- ProFound ConvNeXt / ViT volumes -> stage, token and head outputs.
* :mod:`transfer_jax.features.provicnet` -- ProViCNet slice stacks -> patch tokens, cls and segmentation logits,
  on a data-sharded batch runner.

Kept apart from :mod:`transfer_jax.convert` (which depends on the model definitions only) because extraction
also reads datasets through :mod:`transfer_jax.data`.
"""
