"""Manifests for public prostate-MRI cohorts, built from their release layouts as published.

    python -m transfer_jax.data.manifest picai --images picai_public_images --labels picai_labels \\
        --output picai.csv [--splits picai_baseline/src/picai_baseline/splits/picai] [--fold 0]
    python -m transfer_jax.data.manifest prostate158 --root prostate158_train [--test_root prostate158_test] \\
        --output prostate158.csv

picai: the PI-CAI Public Training and Development Dataset. `--images` holds the unpacked image folds, one folder
per patient with `<patient>_<study>_{t2w,adc,hbv}.mha` (hbv becomes the `dwi` column; sag / cor are not used);
`--labels` is a checkout of picai_labels: `clinical_information/marksheet.csv` (case_ISUP, case_csPCa),
`csPCa_lesion_delineations/...` and `anatomical_delineations/...`, one `<patient>_<study>.nii.gz` per case. Case
ids are `<patient>_<study>`, the subject ids of picai_baseline. Every marksheet study whose patient folder is present
becomes a case; its `isup` column is case_ISUP and `cspca` is 1 for ISUP >= 2 (checked against case_csPCa). The
lesion mask is the first of `--lesion_masks` holding the case (expert masks carry the ISUP grade 2-5 per voxel, AI
and Pooch25 masks 1); `--fold k` of picai_baseline's five folds (`--splits`: a folder of
ds-config-{train,valid}-fold-<k>.json or an nnU-Net splits.json) is `val`, the other folds `train`; without
`--splits`, patients are dealt into `--folds` folds by a seeded shuffle, csPCa-positive and negative patients
separately, so a patient's studies share a fold.

prostate158: `--root` holds train.csv and valid.csv (columns ID, t2, adc, dwi, t2_anatomy_reader1,
adc_tumor_reader1, ...; paths relative to the CSV), `--test_root` (or `--root`) test.csv. Splits follow the lists.
The anatomy masks are zonal (1 = transition zone, 2 = peripheral zone): train with data.gland_labels=(1, 2).

Problems (a missing sequence, a case without a label or a mask, a split listing an absent case) are collected and
printed one per line, naming the case; the command then exits with status 1 and writes nothing, unless
`--on_bad_case=skip` leaves those cases out.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import random
import sys
from typing import Optional

from transfer_jax.data.errors import DataError
from transfer_jax.data.manifest import Case, write_manifest

PICAI_SEQUENCES = {"t2": "t2w", "adc": "adc", "dwi": "hbv"}  # manifest column -> PI-CAI file suffix
PICAI_MARKSHEET = os.path.join("clinical_information", "marksheet.csv")
PICAI_MARKSHEET_COLUMNS = ("patient_id", "study_id", "case_ISUP", "case_csPCa")
PICAI_LESIONS = "csPCa_lesion_delineations"
PICAI_ANATOMY = "anatomical_delineations"
PICAI_DEFAULT_LESIONS = ("human_expert/resampled", "human_expert/Pooch25")
PICAI_DEFAULT_GLAND = "whole_gland/AI/Guerbet23"
CSPCA_MIN_ISUP = 2  # PI-CAI's reference standard: csPCa = ISUP grade group >= 2
PROSTATE158_LISTS = {"train": "train.csv", "val": "valid.csv", "test": "test.csv"}
PROSTATE158_SEQUENCES = ("t2", "adc", "dwi")
_MODULE = "transfer_jax.data.manifest"  # the command's module (this one holds its code)


@dataclasses.dataclass
class Cohort:
    """A cohort's cases and every problem found while listing them (each names its case)."""
    cases: list[Case]
    problems: list[DataError]
    notes: list[str] = dataclasses.field(default_factory=list)  # facts worth a line that are not errors


def _read_csv(path: str, required: tuple[str, ...], what: str) -> list[dict[str, str]]:
    if not os.path.isfile(path):
        raise DataError(f"{what} not found", path=path)
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        missing = [c for c in required if c not in header]
        if missing:
            raise DataError(f"{what} lacks column(s) {missing}; it has {header}", path=path)
        return [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]


# -- PI-CAI --------------------------------------------------------------------------------------------------------


def _isup(row: dict[str, str]) -> tuple[Optional[int], Optional[str]]:
    """case_ISUP as an int 0..5 (checked against case_csPCa), or the problem with it."""
    text = row["case_ISUP"]
    try:
        value = float(text)
    except ValueError:
        return None, f"marksheet case_ISUP is {text!r}, expected an ISUP grade group 0..5"
    if not value.is_integer() or not 0 <= value <= 5:
        return None, f"marksheet case_ISUP is {text!r}, expected an ISUP grade group 0..5"
    flag = row["case_csPCa"].upper()
    if flag not in ("YES", "NO"):
        return None, f"marksheet case_csPCa is {row['case_csPCa']!r}, expected YES or NO"
    if (flag == "YES") != (value >= CSPCA_MIN_ISUP):
        return None, f"marksheet case_csPCa {flag} contradicts case_ISUP {int(value)} (csPCa = ISUP >= 2)"
    return int(value), None


def read_picai_splits(path: str, fold: int) -> tuple[list[str], list[str]]:
    """(train, val) subject ids of one fold from picai_baseline's split files: a folder holding
    ds-config-{train,valid}-fold-<k>.json ({"subject_list": [...]}) or a splits.json (nnU-Net: [{"train", "val"}])."""
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, f"ds-config-valid-fold-{fold}.json")):
        path = os.path.join(path, "splits.json")
    if os.path.isdir(path):
        lists = []
        for kind in ("train", "valid"):
            name = os.path.join(path, f"ds-config-{kind}-fold-{fold}.json")
            try:
                with open(name, encoding="utf-8") as f:
                    lists.append(list(json.load(f)["subject_list"]))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise DataError(f"not a picai_baseline split file with a 'subject_list' ({exc})", path=name) from None
        return lists[0], lists[1]
    try:
        with open(path, encoding="utf-8") as f:
            folds = json.load(f)
        entry = folds[fold]
        return list(entry["train"]), list(entry["val"])
    except IndexError:
        raise DataError(f"has {len(folds)} folds, --fold {fold} is not one of them", path=path) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError("expected a folder of ds-config-{train,valid}-fold-<k>.json or an nnU-Net splits.json "
                        f"(a list of {{'train': [...], 'val': [...]}}) ({type(exc).__name__}: {exc})",
                        path=path) from None


def grouped_folds(groups: dict[str, bool], num_folds: int, seed: int) -> dict[str, int]:
    """Group (patient) -> fold: positive and negative groups shuffled separately with `seed` and dealt in turn, so
    every fold gets a share of both and a group's studies never straddle folds."""
    rng = random.Random(seed)
    folds, offset = {}, 0
    for positive in (True, False):
        members = sorted(g for g, p in groups.items() if p == positive)
        rng.shuffle(members)
        for index, group in enumerate(members):
            folds[group] = (offset + index) % num_folds
        offset += len(members)
    return folds


def _picai_case(row: dict[str, str], images: str, lesion_dirs: list[str], gland_dir: Optional[str],
                problems: list[DataError]) -> Case:
    """One marksheet study as a case (split decided later); what is missing goes to `problems`."""
    patient = row["patient_id"]
    case_id = f"{patient}_{row['study_id']}"
    files = {col: os.path.join(images, patient, f"{case_id}_{suffix}.mha") for col, suffix in PICAI_SEQUENCES.items()}
    for column, path in files.items():
        if not os.path.isfile(path):
            problems.append(DataError(f"missing {PICAI_SEQUENCES[column]} sequence", case_id=case_id, path=path))
    isup, problem = _isup(row)
    if problem:
        problems.append(DataError(problem, case_id=case_id))
    name = f"{case_id}.nii.gz"
    lesion = next((p for p in (os.path.join(d, name) for d in lesion_dirs) if os.path.isfile(p)), None)
    if lesion is None and lesion_dirs:
        problems.append(DataError(f"no lesion delineation {name} in {', '.join(lesion_dirs)}", case_id=case_id))
    gland = os.path.join(gland_dir, name) if gland_dir else None
    if gland is not None and not os.path.isfile(gland):
        problems.append(DataError(f"no gland delineation {name} in {gland_dir}", case_id=case_id))
    return Case(case_id=case_id, split="train", gland_mask=gland, lesion_mask=lesion, **files,
                extra={"patient_id": patient, "isup": "" if isup is None else str(isup),
                       "cspca": "" if isup is None else str(int(isup >= CSPCA_MIN_ISUP))})


def _unmarked_studies(images: str, marked: set[str]) -> list[DataError]:
    """Studies on disk (by their T2 file) that the marksheet does not list, so have no label."""
    found = []
    for entry in sorted(os.listdir(images)):
        if os.path.isdir(os.path.join(images, entry)):
            found += [n.removesuffix("_t2w.mha") for n in sorted(os.listdir(os.path.join(images, entry)))
                      if n.endswith("_t2w.mha")]
    return [DataError(f"not in {PICAI_MARKSHEET} (no ISUP label)", case_id=c) for c in found if c not in marked]


def _split_picai(cohort: Cohort, marked: set[str], splits: Optional[str], fold: int, num_folds: int,
                 seed: int) -> None:
    """Fold `fold` becomes `val`, the others `train`: picai_baseline's folds, else a seeded patient-grouped split."""
    if splits:
        train, val = read_picai_splits(splits, fold)
        split_of = {**{s: "train" for s in train}, **{s: "val" for s in val}}
        cohort.problems += [DataError("listed in the splits but not in the marksheet", case_id=s, path=splits)
                            for s in split_of if s not in marked]
        left_out = [c.case_id for c in cohort.cases if c.case_id not in split_of]
        if left_out:
            cohort.notes.append(f"{len(left_out)} case(s) in no list of the splits are left out, e.g. {left_out[:3]}")
        cohort.cases = [dataclasses.replace(c, split=split_of[c.case_id]) for c in cohort.cases
                        if c.case_id in split_of]
        return
    positive = {}
    for c in cohort.cases:
        positive[c.extra["patient_id"]] = positive.get(c.extra["patient_id"], False) or c.extra["cspca"] == "1"
    folds = grouped_folds(positive, num_folds, seed)
    cohort.cases = [dataclasses.replace(c, split="val" if folds[c.extra["patient_id"]] == fold else "train")
                    for c in cohort.cases]


def picai_cohort(images: str, labels: str, *, fold: int = 0, splits: Optional[str] = None, num_folds: int = 5,
                 seed: int = 0, lesion_masks=PICAI_DEFAULT_LESIONS,
                 gland_mask: Optional[str] = PICAI_DEFAULT_GLAND) -> Cohort:
    """The PI-CAI public cases found under `images`, labelled from the picai_labels checkout `labels`."""
    if not os.path.isdir(images):
        raise DataError("PI-CAI image folder not found", path=images)
    if not 0 <= fold < num_folds:
        raise DataError(f"--fold {fold} is not one of the {num_folds} folds (0..{num_folds - 1})")
    rows = _read_csv(os.path.join(labels, PICAI_MARKSHEET), PICAI_MARKSHEET_COLUMNS, "PI-CAI marksheet")
    lesion_dirs = [os.path.join(labels, PICAI_LESIONS, d) for d in lesion_masks]
    gland_dir = os.path.join(labels, PICAI_ANATOMY, gland_mask) if gland_mask else None
    for folder in lesion_dirs + [gland_dir] * bool(gland_dir):
        if not os.path.isdir(folder):
            raise DataError("delineation folder not found (check --labels, --lesion_masks, --gland_mask)",
                            path=folder)
    marked = {f"{row['patient_id']}_{row['study_id']}" for row in rows}
    cohort = Cohort([], _unmarked_studies(images, marked))
    for row in rows:
        if os.path.isdir(os.path.join(images, row["patient_id"])):  # else its image fold is not there
            cohort.cases.append(_picai_case(row, images, lesion_dirs, gland_dir, cohort.problems))
    if not cohort.cases and not cohort.problems:
        raise DataError("no patient folder of the marksheet here (expected <patient>/<patient>_<study>_t2w.mha)",
                        path=images)
    if len(marked) > len(cohort.cases):
        cohort.notes.append(f"{len(marked) - len(cohort.cases)} marksheet case(s) have no patient folder under "
                            f"{images} (image folds not unpacked there?)")
    _split_picai(cohort, marked, splits, fold, num_folds, seed)
    return cohort


# -- Prostate158 ---------------------------------------------------------------------------------------------------


def prostate158_cohort(root: str, *, test_root: Optional[str] = None,
                       gland_column: Optional[str] = "t2_anatomy_reader1",
                       lesion_column: Optional[str] = "adc_tumor_reader1") -> Cohort:
    """Prostate158's train / valid lists under `root` and its test list under `test_root` (or `root`)."""
    required = ("ID",) + PROSTATE158_SEQUENCES + tuple(c for c in (gland_column, lesion_column) if c)
    problems, cases, notes, seen = [], [], [], set()
    for split, name in PROSTATE158_LISTS.items():
        folder = test_root if split == "test" and test_root else root
        path = os.path.join(folder, name)
        if split == "test" and not test_root and not os.path.isfile(path):
            notes.append(f"no test list ({path}): the manifest has train and val cases only")
            continue
        for row in _read_csv(path, required, f"Prostate158 {name}"):
            case_id = row["ID"]
            if not case_id or case_id in seen:
                problems.append(DataError(f"{'empty' if not case_id else 'duplicate'} ID", case_id=case_id,
                                          path=path))
                continue
            seen.add(case_id)
            files = {}
            for column in PROSTATE158_SEQUENCES + tuple(c for c in (gland_column, lesion_column) if c):
                value = row[column]
                file = os.path.normpath(os.path.join(folder, value)) if value else None
                if file is None:
                    problems.append(DataError(f"empty {column!r} cell: no {column}", case_id=case_id, path=path))
                elif not os.path.isfile(file):
                    problems.append(DataError(f"{column} not found (listed in {name})", case_id=case_id, path=file))
                files[column] = file
            cases.append(Case(
                case_id=case_id, split=split, t2=files["t2"], adc=files["adc"], dwi=files["dwi"],
                gland_mask=files.get(gland_column) if gland_column else None,
                lesion_mask=files.get(lesion_column) if lesion_column else None))
    return Cohort(cases, problems, notes)


# -- command line --------------------------------------------------------------------------------------------------


def _doc(cohort: str) -> str:
    """One cohort's paragraph of the module docstring, then its example command."""
    lines = __doc__.splitlines()
    command = next(i for i, line in enumerate(lines) if line.strip().startswith(f"python -m {_MODULE} {cohort} "))
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{cohort}: "))
    return "\n".join(lines[start:lines.index("", start)] + [""] + lines[command:command + 2])


def build_parser():
    from transfer_jax.cli import ArgumentParser

    parser = ArgumentParser(_MODULE, __doc__)
    commands = parser.add_subparsers(dest="cohort", required=True, metavar="{picai,prostate158}")
    picai = commands.add_parser("picai", module=_MODULE, doc=_doc("picai"))
    picai.add_argument("--images", required=True, help="folder of patient folders of <patient>_<study>_*.mha")
    picai.add_argument("--labels", required=True, help="a picai_labels checkout (holds clinical_information/)")
    picai.add_argument("--splits", help="picai_baseline splits: a folder of ds-config-*-fold-<k>.json or a "
                                        "splits.json (default: a seeded patient-grouped split)")
    picai.add_argument("--fold", type=int, default=0, help="the fold that becomes the val split")
    picai.add_argument("--folds", type=int, default=5, help="folds of the seeded split (without --splits)")
    picai.add_argument("--seed", type=int, default=0, help="seed of the seeded split")
    picai.add_argument("--lesion_masks", default=",".join(PICAI_DEFAULT_LESIONS),
                       help=f"folders under {PICAI_LESIONS}/, first holding the case wins (e.g. add AI/Bosma22a); "
                            "empty: no lesion masks")
    picai.add_argument("--gland_mask", default=PICAI_DEFAULT_GLAND,
                       help=f"folder under {PICAI_ANATOMY}/ (zonal_pz_tz/AI/HeviAI23: PZ 1, TZ 2, so train with "
                            "data.gland_labels=(1, 2)); empty: none")
    p158 = commands.add_parser("prostate158", module=_MODULE, doc=_doc("prostate158"))
    p158.add_argument("--root", required=True, help="the training archive's folder holding train.csv, valid.csv")
    p158.add_argument("--test_root", help="the test archive's folder holding test.csv (default: --root)")
    p158.add_argument("--gland_mask", default="t2_anatomy_reader1", help="CSV column of the gland (zonal) mask; "
                                                                         "empty: none")
    p158.add_argument("--lesion_mask", default="adc_tumor_reader1", help="CSV column of the tumour mask; empty: none")
    for sub in (picai, p158):
        sub.add_argument("--output", required=True, help="the manifest CSV to write")
        sub.add_argument("--on_bad_case", choices=("error", "skip"), default="error",
                         help="error: write nothing if any case has a problem; skip: leave those cases out")
    return parser


def build(args) -> Cohort:
    if args.cohort == "picai":
        return picai_cohort(args.images, args.labels, fold=args.fold, splits=args.splits, num_folds=args.folds,
                            seed=args.seed, lesion_masks=tuple(filter(None, args.lesion_masks.split(","))),
                            gland_mask=args.gland_mask or None)
    return prostate158_cohort(args.root, test_root=args.test_root, gland_column=args.gland_mask or None,
                              lesion_column=args.lesion_mask or None)


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    try:
        cohort = build(args)
    except DataError as exc:
        sys.exit(f"error: {exc}")
    for note in cohort.notes:
        print(f"note: {note}")
    bad = {problem.case_id for problem in cohort.problems}
    if cohort.problems:
        print(f"{len(cohort.problems)} problem(s):", file=sys.stderr)
        for problem in cohort.problems:
            print(f"  - {problem}", file=sys.stderr)
        if args.on_bad_case == "error":
            sys.exit(f"error: nothing written to {args.output}; fix the cases above or pass --on_bad_case=skip")
    cases = [c for c in cohort.cases if c.case_id not in bad]
    if not cases:
        sys.exit("error: no usable case left")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    write_manifest(args.output, cases)
    counts = {s: sum(c.split == s for c in cases) for s in ("train", "val", "test")}
    print(f"wrote {args.output}: {len(cases)} cases ({', '.join(f'{n} {s}' for s, n in counts.items() if n)})"
          + (f", {len(bad)} left out" if bad else ""))
