"""Case-level classification: PI-RADS 2-5 (four classes) or its clinically significant binary split.

Target: the manifest's `label` column, an integer 0..3 = PI-RADS - 2 (upstream's target). With `task.binary=True`
(`configs/cls.py:...,binary`) the target is csPCa-positive = PI-RADS >= 4, i.e. `label >= 2 -> 1`, else 0.
Another column may be the target through a declared mapping: `data.label_column` names it and `data.label_map` maps
its values to classes, either a name in `LABEL_MAPS` (`isup_cspca`: ISUP grade group >= 2 -> 1, PI-CAI's csPCa) or
`"value:class,..."` (e.g. `"NO:0,YES:1"`). A map's classes set the task's: two = binary (csPCa), four = PI-RADS
2-5. Rows without a label, or with a value the encoding does not know, fail the pre-flight check naming the case and
the column.

Model: `Classifier` = backbone + ProFound's MLP head (Linear -> BatchNorm1d -> ReLU -> Linear) on the pooled
feature (ProFound-Conv) or the cls token (ProFound-ViT). Loss: cross-entropy (upstream `nn.CrossEntropyLoss`).
Metrics (`tasks/metrics.py`): four-class `pirads_metrics` (primary `auroc_macro`, one-vs-rest macro AUROC; plus
accuracy, unweighted and quadratic kappa, macro F1 and the >= 3 / >= 4 binary splits); binary `binary_metrics`
(primary `auroc`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from transfer_jax.data.errors import DataError
from transfer_jax.tasks.base import Task
from transfer_jax.tasks.dense import build_classifier
from transfer_jax.tasks.metrics import PIRADS_NUM_CLASSES, binary_metrics, pirads_metrics

BINARY_THRESHOLD = 2  # label (PI-RADS - 2) >= 2  <=>  PI-RADS >= 4: csPCa-positive
LABEL_MAPS = {
    "isup_cspca": "0:0,1:0,2:1,3:1,4:1,5:1",  # ISUP grade group -> csPCa (ISUP >= 2), PI-CAI's reference standard
    "pirads_cspca": "0:0,1:0,2:1,3:1",  # PI-RADS - 2 -> PI-RADS >= 4, the `binary` target as a map
}


def _value_key(text) -> str:
    """A cell as a map key: numbers by value ("2.0" is "2"), other text as written."""
    text = str(text).strip()
    try:
        value = float(text)
    except ValueError:
        return text
    return str(int(value)) if value.is_integer() else text


def parse_label_map(spec: str) -> dict[str, int]:
    """`data.label_map` (a `LABEL_MAPS` name or "value:class,...") as {value: class}; the classes must be 0..1
    (binary) or 0..3 (PI-RADS), each one used."""
    text = LABEL_MAPS.get(spec, spec)
    mapping = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        value, sep, cls = item.rpartition(":")
        if not sep or not value.strip() or not cls.strip().isdigit():
            raise ValueError(f"data.label_map {spec!r}: entry {item!r} is not 'value:class'; give a name from "
                             f"{sorted(LABEL_MAPS)} or 'value:class,...'")
        mapping[_value_key(value)] = int(cls)
    classes = sorted(set(mapping.values()))
    if classes not in ([0, 1], list(range(PIRADS_NUM_CLASSES))):
        raise ValueError(f"data.label_map {spec!r} maps to classes {classes}; classification takes classes 0, 1 "
                         f"(binary) or 0..{PIRADS_NUM_CLASSES - 1} (PI-RADS 2-5)")
    return mapping


def parse_label(text, case_id: str | None = None) -> int:
    """The manifest `label` cell as an int in 0..3, or a DataError naming the case and the column."""
    if text is None or str(text).strip() == "":
        raise DataError("classification needs an integer 'label' (PI-RADS - 2, 0..3) in the manifest, but the "
                        "'label' cell is empty", case_id=case_id)
    try:
        value = float(str(text).strip())
    except ValueError:
        raise DataError(f"the 'label' column holds {text!r}, which is not a number; expected an integer 0..3 "
                        "(PI-RADS - 2)", case_id=case_id) from None
    if not value.is_integer() or not 0 <= value < PIRADS_NUM_CLASSES:
        raise DataError(f"the 'label' column holds {text!r}; expected an integer 0..3 (PI-RADS - 2)",
                        case_id=case_id)
    return int(value)


def binary_target(label):
    """PI-RADS (0..3 = PI-RADS 2..5) -> csPCa-positive (PI-RADS >= 4) as 0/1."""
    return (np.asarray(label) >= BINARY_THRESHOLD).astype(np.int32)


class ClassificationTask(Task):
    name = "classification"
    direction = "max"

    def __init__(self, config):
        super().__init__(config)
        self.label_column = config.data.get("label_column", "label") or "label"
        spec = config.data.get("label_map", "")
        if self.label_column != "label" and not spec:
            raise ValueError(f"data.label_column={self.label_column!r} needs a data.label_map (the default encoding "
                             "is PI-RADS - 2 in the 'label' column), e.g. data.label_map=isup_cspca")
        self.label_map = parse_label_map(spec) if spec else None
        self.binary = bool(config.task.get("binary", False))
        if self.label_map is not None:
            mapped_binary = max(self.label_map.values()) == 1
            if self.binary and not mapped_binary:
                raise ValueError(f"task.binary needs a two-class data.label_map; {spec!r} has four classes")
            self.binary = mapped_binary
        self.num_classes = 2 if self.binary else PIRADS_NUM_CLASSES
        self.primary_metric = "auroc" if self.binary else "auroc_macro"

    def target(self, text, case_id: str | None = None) -> int:
        """The class index of a case's label cell, or a DataError naming the case and the column."""
        if self.label_map is None:
            label = parse_label(text, case_id)
            return int(binary_target(label)) if self.binary else label
        key = None if text is None else _value_key(text)
        if key not in self.label_map:
            raise DataError(f"the {self.label_column!r} column holds {text!r}, which data.label_map does not map; "
                            f"it maps {sorted(self.label_map)}", case_id=case_id)
        return self.label_map[key]

    def validate_case(self, case, prepared) -> None:
        self.target(case.label, case.case_id)

    def make_sample(self, sample: dict) -> dict[str, np.ndarray]:
        return {"image": sample["image"], "label": np.int32(self.target(sample.get("label")))}

    def build_model(self, rngs: nnx.Rngs):
        return build_classifier(self.config.model, self.num_classes, rngs,
                                bottleneck_dim=int(self.config.task.get("bottleneck_dim", 256)))

    def loss(self, outputs, batch):
        logits = outputs.astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, batch["label"][:, None].astype(jnp.int32), axis=-1)[:, 0]
        loss = jnp.mean(nll)
        return loss, {"loss_ce": loss}

    def eval_stats(self, outputs, batch):
        return {"probs": jax.nn.softmax(outputs.astype(jnp.float32), axis=-1), "label": batch["label"]}

    def summarize(self, stats):
        probs, labels = np.asarray(stats["probs"], np.float64), np.asarray(stats["label"]).astype(np.int64)
        if self.binary:
            return {k: float(v) for k, v in binary_metrics(probs[:, 1], labels).items()}
        return {k: float(v) for k, v in pirads_metrics(probs, labels).items()}
