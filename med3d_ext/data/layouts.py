"""Raw dataset layouts: MSD ``dataset.json``, nnU-Net v2 ``dataset.json``, MedicalNet lists,
and classification folders (``labels.csv`` with ``image,label``).

Every layout is described by one :class:`Dataset`. ``load_dataset(path)`` detects the layout
of a folder (or takes a MedicalNet ``.txt`` list file directly); ``load_dataset(path,
split="test")`` gives the held-out test images instead (MSD ``test`` list or ``imagesTs/``,
nnU-Net v2 ``imagesTs/``, a MedicalNet ``test.txt``), usually unlabelled.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .io import DataError, DataPathError, as_path

CT_NAMES = {"ct", "cta", "ct_arterial", "ct_venous", "pet/ct"}


@dataclass
class Case:
    """One training case. ``images`` has one path per channel file (nnU-Net: one per
    ``_XXXX``), or one 4-D/3-D file (MSD). ``label`` may be None (unlabelled)."""

    name: str
    images: list
    label: Path | None = None


@dataclass
class Dataset:
    """A raw dataset, whatever its layout.

    root:     the dataset folder
    name:     dataset name (dataset.json "name" or the folder name)
    layout:   "msd", "nnunet" or "medicalnet"
    channels: channel (sequence) names in file order, e.g. ["FLAIR", "T1w", "t1gd", "T2w"]
    labels:   {value: class name}; None when the layout declares none (MedicalNet lists)
    cases:    list of :class:`Case`
    problems: files named by the layout that do not exist (cases dropped with skip_bad)
    targets:  classification layout only: {case name: class index}
    classes:  classification layout only: {class index: class name}
    source:   what it was opened from: the folder, or a MedicalNet list file (two lists in one
              folder are two datasets; the default cache folder is keyed by it)
    """

    root: Path
    name: str
    layout: str
    channels: list
    labels: dict | None
    cases: list
    problems: list = field(default_factory=list)
    targets: dict | None = None
    classes: dict | None = None
    source: Path | None = None

    @property
    def modality(self) -> str:
        """"CT" when any channel is CT (CT normalisation applies), else "MR" (per-volume)."""
        return "CT" if any(c.strip().lower() in CT_NAMES for c in self.channels) else "MR"

    @property
    def is_ct(self) -> bool:
        return self.modality == "CT"

    @property
    def num_classes(self) -> int | None:
        return None if self.labels is None else max(self.labels) + 1

    @property
    def class_names(self) -> list | None:
        if self.labels is None:
            return None
        return [self.labels.get(i, f"class{i}") for i in range(self.num_classes)]

    def channel_index(self, channel) -> int:
        """Index of a channel given by name (case-insensitive) or index; None -> 0."""
        if channel is None:
            return 0
        if isinstance(channel, int) or (isinstance(channel, str) and channel.isdigit()):
            i = int(channel)
            if not 0 <= i < len(self.channels):
                raise ValueError(f"{self.name}: channel {i} out of range; channels are "
                                 f"{self.channels}")
            return i
        low = [c.lower() for c in self.channels]
        if channel.lower() not in low:
            raise ValueError(f"{self.name}: no channel named {channel!r}; channels are "
                             f"{self.channels}")
        return low.index(channel.lower())

    def __len__(self) -> int:
        return len(self.cases)

    def summary(self) -> str:
        cls = "undeclared" if self.labels is None else f"{self.num_classes} {self.class_names}"
        return (f"{self.name} [{self.layout}] {len(self.cases)} cases, {self.modality}, "
                f"channels {self.channels}, classes {cls}")


def _read_text(path: Path) -> str:
    """A dataset's text file (dataset.json, list files): UTF-8, with or without the byte-order
    mark that Windows editors write (else it ends up in the first path), or a DataError naming
    the file when it is not UTF-8."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(path, f"is not UTF-8 text ({e}); save it as UTF-8") from None


def _load_json(path: Path) -> dict:
    try:
        meta = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(path, f"invalid JSON ({e})") from None
    if not isinstance(meta, dict):  # e.g. null or a list: "'NoneType' is not iterable" later
        raise DataError(path, f"must hold a JSON object ({{\"training\": ...}}), got "
                              f"{type(meta).__name__}")
    return meta


# dataset.json keys the loaders read, and what a misspelt one silently changed (the key was
# ignored and its default used): a key close to one of these, with that key (or the one that
# takes its role in the other layout) absent, is refused as a typo.
_READ_KEYS = {
    "modality": "every channel was read as 'unknown' and normalised as MR, not CT",
    "channel_names": "the file was read as an MSD dataset.json",
    "labels": "the classes were taken from the label files' values",
    "training": "no training case was found",
    "test": "the test images were taken from imagesTs/",
    "file_ending": "files were looked for as .nii.gz",
    "name": "the folder's name named the dataset (and its head)",
}
_SAME_ROLE = {"modality": "channel_names", "channel_names": "modality"}
# keys of MSD / nnU-Net files that nothing here reads, and which are not typos
_OTHER_KEYS = {"description", "reference", "licence", "license", "release", "tensorImageSize",
               "numTraining", "numTest", "overwrite_image_reader_writer",
               "regions_class_order", "dataset_name", "converted_by", "author"}


def _check_key_typos(js: Path, meta: dict) -> None:
    import difflib

    for key in meta:
        if key in _READ_KEYS or key in _OTHER_KEYS or not isinstance(key, str):
            continue
        close = difflib.get_close_matches(key, list(_READ_KEYS), n=1, cutoff=0.75)
        if not close:
            continue
        want = close[0]
        if want in meta or _SAME_ROLE.get(want) in meta:
            continue
        raise DataError(js, f"key {key!r} is not one med3d_ext reads; did you mean {want!r}? "
                            f"(Read as written, {_READ_KEYS[want]}.)")


def _entry(js: Path, what: str, entry) -> tuple[str, str | None]:
    """(image, label or None) of a dataset.json training/test entry: a path string or an
    {"image": path, "label": path} object, or a DataError showing the entry."""
    if isinstance(entry, str):
        entry = {"image": entry}
    if not isinstance(entry, dict) or "image" not in entry:
        raise DataError(js, f"{what} entry without 'image': {entry!r}"[:300])
    img, lab = entry["image"], entry.get("label")
    for key, v in (("image", img), ("label", lab)):
        if not (isinstance(v, str) and v) and not (key == "label" and not v):
            raise DataError(js, f"{what} entry's '{key}' must be a file path, got {v!r} in "
                                f"{entry!r}"[:300])
    return img, lab or None


def _check_exists(ds: Dataset, skip_bad: bool) -> Dataset:
    kept = []
    for c in ds.cases:
        missing = [p for p in [*c.images, c.label] if p is not None and not Path(p).exists()]
        if missing:
            msg = f"{missing[0]}: file named by the dataset does not exist (case {c.name})"
            if not skip_bad:
                raise DataError(missing[0], f"file named by the dataset does not exist "
                                            f"(case {c.name})")
            ds.problems.append(msg)
            if ds.targets is not None:
                ds.targets.pop(c.name, None)
        else:
            kept.append(c)
    ds.cases = kept
    if not kept:
        raise DataError(ds.root, "empty dataset: no usable cases" +
                        (f" ({len(ds.problems)} skipped as bad)" if ds.problems else ""))
    return ds


def _rel(root: Path, p: str) -> Path:
    return (root / p).resolve() if not Path(p).is_absolute() else Path(p)


def _case_name(path: str, ending: str | None = None) -> str:
    name = Path(path).name
    for e in ([ending] if ending else []) + [".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"]:
        if e and name.endswith(e):
            return name[: -len(e)]
    return name


def _int_keyed(js: Path, what: str, d) -> dict:
    """An {"0": name, ...} mapping with integer keys, or a DataError saying what is wrong."""
    example = ('{"0": "background", "1": ...}' if what == "labels" else
               '{"0": "benign", "1": ...}' if what == "classes" else '{"0": "CT", ...}')
    if not isinstance(d, dict):
        raise DataError(js, f"'{what}' must be a mapping like {example}, got "
                            f"{type(d).__name__} {d!r}"[:300])
    try:
        return {int(k): v for k, v in d.items()}
    except (TypeError, ValueError):
        bad = next(k for k in d if not str(k).strip().lstrip("-").isdigit())
        hint = (" (nnU-Net v2 files, which map label names to values, also have "
                "'channel_names' and 'file_ending')") if what == "labels" else ""
        raise DataError(js, f"'{what}' key {bad!r} is not an integer; expected {example}"
                            + hint) from None


def _load_msd(root: Path, meta: dict) -> Dataset:
    js = root / "dataset.json"
    if "modality" not in meta:  # CT would be normalised as MR (z-score, no HU clip), unsaid
        warnings.warn(f"{js}: no 'modality' key: the channel is read as 'unknown' and normalised "
                      "as MR; for CT give {\"modality\": {\"0\": \"CT\"}}", stacklevel=3)
    mod = _int_keyed(js, "modality", meta.get("modality", {"0": "unknown"}))
    channels = [mod[k] for k in sorted(mod)]
    labels = _int_keyed(js, "labels", meta.get("labels", {})) or None
    training = meta.get("training", [])
    if not isinstance(training, list):
        raise DataError(js, f"'training' must be a list of {{\"image\": ..., \"label\": ...}} "
                            f"entries, got {type(training).__name__}")
    cases = []
    for entry in training:
        img, lab = _entry(js, "training", entry)
        # an entry without a label is an unlabelled case: evaluate predicts it, and training
        # refuses the dataset naming such cases (train/tasks.py seg_classes)
        cases.append(Case(_case_name(img), [_rel(root, img)], _rel(root, lab) if lab else None))
    return Dataset(root, meta.get("name", root.name), "msd", channels, labels, cases)


IMAGE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


def _test_label(root: Path, name: str, ending: str) -> Path | None:
    """A test case's reference label, when the dataset ships one (``labelsTs/<case><ending>``,
    as some nnU-Net / MSD-style folders do); None for the usual unlabelled test image."""
    p = root.resolve() / "labelsTs" / f"{name}{ending}"
    return p if p.is_file() else None


def _image_files(folder: Path) -> list:
    if not folder.is_dir():
        return []
    return [p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")
            and p.name.lower().endswith(IMAGE_ENDINGS)]  # "._x" macOS forks, README files


def _load_msd_test(root: Path, meta: dict) -> Dataset:
    """MSD test images: dataset.json's ``test`` list (paths, or {"image": ...} entries) when it
    names any, else every image in ``imagesTs/``."""
    ds = _load_msd(root, dict(meta, training=[]))
    js = root / "dataset.json"
    test = meta.get("test") or []
    if not isinstance(test, list):
        raise DataError(js, f"'test' must be a list of image paths, got {type(test).__name__}")
    cases = []
    if test:
        for entry in test:
            img, lab = _entry(js, "test", entry)
            name = _case_name(img)
            label = _rel(root, lab) if lab else _test_label(root, name, ".nii.gz")
            cases.append(Case(name, [_rel(root, img)], label))
    else:
        folder = root / "imagesTs"
        files = _image_files(folder)
        if not files:
            where = (f"{folder} holds no images ({', '.join(IMAGE_ENDINGS)})" if folder.is_dir()
                     else f"there is no {folder} folder")
            raise DataError(js, f"no test images: its 'test' list is empty or missing and {where}")
        for f in files:
            name = _case_name(f.name)
            ending = f.name[len(name):]
            cases.append(Case(name, [f.resolve()], _test_label(root, name, ending)))
    ds.cases = cases
    return ds


def _load_nnunet(root: Path, meta: dict, split: str = "train") -> Dataset:
    js = root / "dataset.json"
    chan = _int_keyed(js, "channel_names", meta["channel_names"])
    channels = [chan[k] for k in sorted(chan)]
    labels = {}
    lab = meta.get("labels", {})
    if not isinstance(lab, dict):
        raise DataError(js, f"'labels' must be a mapping like {{\"background\": 0}}, got "
                            f"{type(lab).__name__}")
    for name, v in lab.items():
        if isinstance(v, str) and str(name).isdigit():  # MSD's value -> name direction
            raise DataError(js, f"labels: {name!r}: {v!r} maps a value to a name (MSD style); "
                                "nnU-Net v2 maps names to values: {\"background\": 0, ...}")
        if isinstance(v, (list, tuple)):  # region-based training: tuples of labels
            raise DataError(js, f"label {name!r} is a region {v}; only integer labels are "
                                "supported")
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise DataError(js, f"label {name!r} has value {v!r}; nnU-Net v2 label values are "
                                "non-negative JSON integers ({\"background\": 0, ...}), not "
                                "strings, floats or booleans")
        labels[v] = name
    ending = meta.get("file_ending", ".nii.gz")
    # absolute, as _rel makes them for the other layouts: the cache records these paths, and
    # evaluate reads the labels from any working directory
    sub = "Ts" if split == "test" else "Tr"
    img_dir, lab_dir = root.resolve() / f"images{sub}", root.resolve() / f"labels{sub}"
    if not img_dir.is_dir():
        raise DataError(img_dir, f"nnU-Net dataset has no images{sub} folder"
                                 + (" (no test images)" if split == "test" else ""))
    pat = re.compile(r"^(.*)_(\d{4})" + re.escape(ending) + "$")
    found: dict = {}
    for p in sorted(img_dir.iterdir()):
        m = pat.match(p.name)
        if m and not p.name.startswith("."):  # macOS "._x_0000.nii.gz" resource forks
            found.setdefault(m.group(1), {})[int(m.group(2))] = p
    if not found:
        # a file_ending that does not match the files ("nii.gz" without the dot, ".nii" for
        # .nii.gz files) left nothing but "empty dataset" to go by
        seen = sorted(p.name for p in img_dir.iterdir() if not p.name.startswith("."))
        raise DataError(img_dir, f"holds no {'test' if split == 'test' else 'training'} images "
                                 f"named <case>_<channel:4 digits>{ending} (dataset.json "
                                 f"'file_ending' is {ending!r}); found: "
                                 + (", ".join(seen[:5]) + (", ..." if len(seen) > 5 else "")
                                    if seen else "nothing"))
    cases = []
    for name in sorted(found):
        files = found[name]
        imgs = [files.get(i, img_dir / f"{name}_{i:04d}{ending}") for i in range(len(channels))]
        lab = lab_dir / f"{name}{ending}"
        if split == "test" and not lab.is_file():
            lab = None  # test images are usually unlabelled; labelsTs/ is optional
        cases.append(Case(name, imgs, lab))
    return Dataset(root, meta.get("name", root.name), "nnunet", channels, labels or None, cases)


def _load_medicalnet(list_file: Path, root: Path | None = None) -> Dataset:
    root = root or list_file.parent
    cases = []
    for n, line in enumerate(_read_text(list_file).splitlines(), 1):
        parts = line.split()
        if not parts or line.lstrip().startswith("#"):
            continue
        if len(parts) not in (1, 2):
            raise DataError(list_file, f"line {n}: expected 'image label', got {line!r}")
        cases.append(Case(_case_name(parts[0]), [_rel(root, parts[0])],
                          _rel(root, parts[1]) if len(parts) == 2 else None))
    # a sidecar labels.json {"0": "background", ...} may declare classes and modality
    side = root / "labels.json"
    labels, channels = None, ["MR"]
    if side.exists():
        s = _load_json(side)
        raw = s["labels"] if "labels" in s else {k: v for k, v in s.items() if k != "modality"}
        labels = _int_keyed(side, "labels", raw) or None
        modality = s.get("modality", "MR")
        if not isinstance(modality, str) or not modality:
            raise DataError(side, f"'modality' must be a name such as \"CT\" or \"MR\", got "
                                  f"{modality!r}")
        channels = [modality]
    return Dataset(root, root.name, "medicalnet", channels, labels, cases)


def _load_classification(root: Path) -> Dataset:
    """images + labels.csv (``image,label``; label an integer class); an optional
    classes.json gives {"modality": ..., "classes": {index: name}}."""
    import csv

    lst = root / "labels.csv"
    with open(lst, newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets write a BOM
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"image", "label"} <= set(reader.fieldnames):
            raise DataError(lst, f"expected columns 'image,label', got {reader.fieldnames}")
        rows = list(reader)
    from collections import Counter

    # per-class folders (benign/001.nii.gz, malignant/001.nii.gz) share base names: such
    # cases are named by their path under the root instead
    base = Counter(_case_name(r["image"] or "") for r in rows)
    cases, targets = [], {}
    for n, row in enumerate(rows, 2):
        try:
            y = int(row["label"])
        except (TypeError, ValueError):
            raise DataError(lst, f"line {n}: label {row['label']!r} is not an integer class") \
                from None
        if y < 0:  # CE fails on it only at training time, far from the file
            raise DataError(lst, f"line {n}: label {y} is negative; classes are 0, 1, ...")
        if not row["image"]:  # an empty cell or a short row: the root folder itself as image
            raise DataError(lst, f"line {n}: no image path ({row!r})")
        name = _case_name(row["image"])
        if base[name] > 1:
            name = _case_name(Path(row["image"]).as_posix().lstrip("./").replace("/", "_"))
        if name in targets:
            raise DataError(lst, f"line {n}: case {name!r} listed twice")
        cases.append(Case(name, [_rel(root, row["image"])], None))
        targets[name] = y
    side = root / "classes.json"
    s = _load_json(side) if side.exists() else {}
    names = s.get("classes", {str(k): str(k) for k in sorted(set(targets.values()))})
    classes = _int_keyed(side, "classes", names)
    bad = sorted(set(targets.values()) - set(classes))
    if bad:
        raise DataError(lst, f"labels {bad} not declared in classes.json ({sorted(classes)})")
    return Dataset(root, root.name, "classification", [s.get("modality", "MR")], None, cases,
                   targets=targets, classes=classes)


def detect_layout(path) -> str:
    """"msd", "nnunet", "medicalnet" or "classification" (labels.csv) for a dataset folder
    (or a MedicalNet list file)."""
    path = as_path(path)
    if path.is_file() and path.suffix == ".txt":
        return "medicalnet"
    if not path.exists():
        raise DataPathError(path, "dataset folder does not exist")
    if not path.is_dir():
        raise DataPathError(path, "is a file; name the dataset folder (the one holding "
                                  "dataset.json, labels.csv or a MedicalNet train.txt)")
    if (path / "labels.csv").exists() and not (path / "dataset.json").exists():
        return "classification"
    js = path / "dataset.json"
    if js.exists():
        meta = _load_json(js)
        if "channel_names" in meta:
            return "nnunet"
        if "modality" in meta or "training" in meta:
            return "msd"
        raise DataError(js, "dataset.json is neither MSD (modality/training) nor nnU-Net v2 "
                            "(channel_names/file_ending)")
    if _find_list(path) is not None:
        return "medicalnet"
    raise DataPathError(path, "no dataset.json (MSD / nnU-Net v2) and no MedicalNet list "
                              "file (*.txt with 'image label' lines) found")


def _find_list(root: Path) -> Path | None:
    for name in ("train.txt", "train_list.txt", "list.txt"):
        if (root / name).exists():
            return root / name
    txts = sorted(root.glob("*.txt"))
    for t in txts:
        first = next((ln for ln in t.read_text(errors="replace").splitlines() if ln.strip()), "")
        if first.split() and _is_image_name(first.split()[0]):
            return t
    return None


def _is_image_name(s: str) -> bool:
    return s.lower().endswith((".nii", ".nii.gz", ".nrrd", ".mha", ".mhd"))


def load_dataset(path, *, skip_bad: bool = False, split: str = "train") -> Dataset:
    """Open a raw dataset folder (MSD or nnU-Net v2 ``dataset.json``, or a MedicalNet list).

    split: "train" (the labelled training cases: MSD ``training``, ``imagesTr/``, the
    MedicalNet list) or "test" (the test images: MSD ``test`` list, else ``imagesTs/``; nnU-Net
    ``imagesTs/``; MedicalNet ``test.txt`` beside the list). Test cases take a label from
    ``labelsTs/`` when one exists, else have none. Channels, labels and name are the
    dataset's either way.

    Missing files raise :class:`DataError` naming the file; with ``skip_bad`` their cases are
    dropped and listed in ``Dataset.problems``. An empty dataset always raises.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
    path = as_path(path)
    layout = detect_layout(path)
    if split == "test" and layout == "classification":
        raise DataError(path, "a classification folder (labels.csv) has no test split; list "
                              "the images to predict in a labels.csv of their own")
    if layout == "medicalnet":
        lst = path if path.is_file() else _find_list(path)
        if split == "test":
            root = lst.parent
            if not (root / "test.txt").is_file():
                raise DataError(root, "no test images: a MedicalNet list folder keeps them in "
                                      "test.txt (one image path per line)")
            ds = _load_medicalnet(root / "test.txt", root)
            ds.source = (root / "test.txt").resolve()
        else:
            ds = _load_medicalnet(lst)
            ds.source = lst.resolve()
    elif layout == "classification":
        ds = _load_classification(path)
    else:
        meta = _load_json(path / "dataset.json")
        _check_key_typos(path / "dataset.json", meta)
        if layout == "msd":
            ds = _load_msd_test(path, meta) if split == "test" else _load_msd(path, meta)
        else:
            ds = _load_nnunet(path, meta, split)
    if ds.source is None:
        ds.source = path.resolve()
    _unique_names(ds)
    return _check_exists(ds, skip_bad)


def _unique_names(ds: Dataset) -> None:
    """Case names key the cache files: make repeated names (e.g. MedicalNet lists pooling
    folders with the same file names) unique by their path under the root."""
    from collections import Counter

    count = Counter(c.name for c in ds.cases)
    for c in ds.cases:
        if count[c.name] > 1:
            try:
                rel = Path(c.images[0]).relative_to(ds.root.resolve())
            except ValueError:
                rel = Path(c.images[0])
            old = c.name
            c.name = "_".join([*rel.parent.parts, old]).lstrip("/_")
            if ds.targets is not None and old in ds.targets:
                raise DataError(ds.root, f"case name {old!r} appears more than once")
    dup = [n for n, k in Counter(c.name for c in ds.cases).items() if k > 1]
    if dup:
        raise DataError(ds.root, f"case names {dup} appear more than once")


def find_datasets(path) -> list:
    """``--data`` for pretraining may name one dataset or a folder of them (synth's
    ``pretrain/``): returns [path] for a dataset, else its dataset subfolders sorted by name
    (the order that ``dataset_id`` indexes)."""
    path = as_path(path)
    try:
        detect_layout(path)
        return [path]
    except DataError:
        pass
    subs = []
    for p in sorted(q for q in path.iterdir() if q.is_dir()) if path.is_dir() else []:
        try:
            detect_layout(p)
            subs.append(p)
        except DataError:
            # a folder that means to be a dataset but is broken must not drop out unnoticed:
            # kept, so that loading it reports what is wrong (as the training CLI does); other
            # folders (a cache, notes) are not datasets
            if (p / "dataset.json").is_file() or (p / "labels.csv").is_file():
                subs.append(p)
            continue
    if not subs:
        raise DataPathError(path, "neither a dataset (dataset.json, MedicalNet list or "
                                  "labels.csv) nor a folder of datasets")
    return subs
