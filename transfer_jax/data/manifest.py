"""The dataset manifest: one CSV row per case.

Columns (header required, order free):

| column        | required | meaning                                                                  |
|---------------|----------|--------------------------------------------------------------------------|
| `case_id`     | yes      | unique identifier, used in logs, predictions and errors                  |
| `t2`          | yes      | T2-weighted image; defines the reference grid                            |
| `adc`         | yes      | ADC map (resampled onto the T2 grid if its grid differs)                 |
| `dwi`         | yes      | high-b DWI (likewise)                                                    |
| `gland_mask`  | no       | prostate mask (values per `data.gland_labels`), cropping, segmentation   |
| `lesion_mask` | no       | lesion mask (values per `data.lesion_labels`, e.g. ISUP grades)          |
| `label`       | no       | case-level label (PI-RADS - 2) for classification; `data.label_column`   |
| `split`       | yes      | `train`, `val` or `test`                                                 |
| anything else | no       | kept with the case (`Case.extra`); a task may read its label from one    |

Image columns take NIfTI (`.nii`, `.nii.gz`), MetaImage (`.mha`, `.mhd`; PI-CAI ships `.mha`), NRRD (`.nrrd`,
`.nhdr`) or a folder holding one DICOM series; formats may be mixed within a case. All but NIfTI need SimpleITK
(`pip install "transfer_jax[itk]"`). Whatever the format, the world geometry is read as RAS millimetres (ITK's LPS
converted), so sequences line up across formats (`readers`).

Paths are relative to the manifest's folder (absolute paths are kept as they are). Empty cells mean "absent".
Mask values are read through the `data.*_labels` label maps (preprocess.PreprocessConfig); the case label may come
from another column (`read_manifest(label_column=...)`, mapped to classes by `data.label_map`).

`python -m transfer_jax.data.manifest {picai,prostate158} ...` writes the manifest of a public cohort from its
release layout (`cohorts`).
"""
from __future__ import annotations

import csv
import dataclasses
import os
from typing import Optional

from transfer_jax.data.errors import DataError

REQUIRED_COLUMNS = ("case_id", "t2", "adc", "dwi", "split")
OPTIONAL_COLUMNS = ("gland_mask", "lesion_mask", "label")
SPLITS = ("train", "val", "test")
SEQUENCES = ("t2", "adc", "dwi")


@dataclasses.dataclass(frozen=True)
class Case:
    case_id: str
    t2: str
    adc: str
    dwi: str
    split: str
    gland_mask: Optional[str] = None
    lesion_mask: Optional[str] = None
    label: Optional[str] = None  # kept as text: tasks decide how to parse and validate it
    extra: dict[str, str] = dataclasses.field(default_factory=dict)  # the manifest's other columns, verbatim

    def path(self, role: str) -> Optional[str]:
        return getattr(self, role)


def read_manifest(path: str, label_column: str = "label") -> list[Case]:
    """Parse and validate a manifest; every problem found is reported in one DataError.

    `label_column` is the column read as `Case.label` (e.g. a cohort's `isup`); a task maps its text to a class.
    """
    if not os.path.isfile(path):
        raise DataError("manifest not found", path=path)
    base = os.path.dirname(os.path.abspath(path))
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise DataError(
                f"manifest is missing required column(s) {missing}; it has {header}. Required: "
                f"{list(REQUIRED_COLUMNS)}, optional: {list(OPTIONAL_COLUMNS)}",
                path=path,
            )
        if label_column not in header and label_column != "label":
            raise DataError(f"manifest has no column {label_column!r} to read labels from; it has {header}",
                            path=path)
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    standard = set(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)

    problems, cases, seen = [], [], set()
    for line, row in enumerate(rows, start=2):
        case_id = row["case_id"]
        if not case_id:
            problems.append(f"line {line}: empty case_id")
            continue
        if case_id in seen:
            problems.append(f"line {line}: duplicate case_id {case_id!r}")
            continue
        seen.add(case_id)
        if row["split"] not in SPLITS:
            problems.append(f"line {line} (case {case_id!r}): split {row['split']!r} is not one of {SPLITS}")
            continue
        empty = [c for c in SEQUENCES if not row[c]]
        if empty:
            problems.append(f"line {line} (case {case_id!r}): empty path in column(s) {empty}")
            continue

        def resolve(column: str) -> Optional[str]:
            value = row.get(column, "")
            if not value:
                return None
            return value if os.path.isabs(value) else os.path.normpath(os.path.join(base, value))

        cases.append(Case(
            case_id=case_id, t2=resolve("t2"), adc=resolve("adc"), dwi=resolve("dwi"), split=row["split"],
            gland_mask=resolve("gland_mask"), lesion_mask=resolve("lesion_mask"),
            label=row.get(label_column) or None, extra={k: v for k, v in row.items() if k and k not in standard},
        ))
    if problems:
        raise DataError("invalid manifest:\n  " + "\n  ".join(problems), path=path)
    if not cases:
        raise DataError("manifest has no cases", path=path)
    return cases


def write_manifest(path: str, cases: list[Case]) -> None:
    """Write cases with paths relative to the manifest's folder (the inverse of read_manifest)."""
    base = os.path.dirname(os.path.abspath(path))
    columns = list(REQUIRED_COLUMNS[:1]) + list(SEQUENCES) + ["gland_mask", "lesion_mask", "label", "split"]
    extra = sorted({k for case in cases for k in case.extra} - set(columns))
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns + extra)
        writer.writeheader()
        for case in cases:
            row = {column: case.extra.get(column, "") for column in extra}
            for column in columns:
                value = getattr(case, column)
                if value is not None and column in SEQUENCES + ("gland_mask", "lesion_mask"):
                    value = os.path.relpath(value, base)
                row[column] = "" if value is None else value
            writer.writerow(row)


def cases_in_split(cases: list[Case], split: str) -> list[Case]:
    return [c for c in cases if c.split == split]


def main(argv=None) -> None:
    """`python -m transfer_jax.data.manifest`: build a public cohort's manifest (see transfer_jax.data.cohorts)."""
    from transfer_jax.data.cohorts import main as cohorts_main

    cohorts_main(argv)


if __name__ == "__main__":
    main()
