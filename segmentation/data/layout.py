"""Reading a dataset folder in the Medical Segmentation Decathlon (MSD) or nnU-Net v2 layout.

A dataset folder holds ``dataset.json``, ``imagesTr/``, ``labelsTr/`` and optionally
``imagesTs/``. Two conventions for ``dataset.json`` exist and are told apart by their keys:

* nnU-Net v2: ``channel_names`` ({"0": "CT"}), ``labels`` (name → value), ``numTraining``,
  ``file_ending``; images are ``imagesTr/CASE_0000.nii.gz``, ``CASE_0001...`` (one file per
  channel) and labels ``labelsTr/CASE.nii.gz``.
* MSD: ``modality`` ({"0": "MRI"}), ``labels`` (value → name), ``numTraining``, ``training``
  (a list of {"image", "label"} paths) and optional ``test``; one image file per case, 4D with the
  channels on the last axis when there are several modalities.

:func:`read_dataset` normalises both into a :class:`DatasetInfo`. It only discovers files; it
does not open them, so :func:`segmentation.data.check.check_dataset` can report every problem.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

DATASET_JSON = "dataset.json"
NNUNET_KEYS = ("channel_names", "labels", "numTraining", "file_ending")
MSD_KEYS = ("modality", "labels", "numTraining", "training")
FILE_ENDINGS = (".nii.gz", ".nii")
CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


class DatasetError(ValueError):
    """A dataset folder or one of its files is not usable.

    Attributes:
        file: the file (or folder) at fault.
        problem: what is wrong with it, without the file name.
    """

    def __init__(self, file: str | Path, problem: str) -> None:
        self.file = Path(file)
        self.problem = problem
        super().__init__(f"{self.file}: {problem}")


@dataclass(frozen=True)
class Case:
    """One case: its image file(s) and label file.

    Attributes:
        case_id: identifier, the file name without channel suffix and file ending.
        images: one file per channel (nnU-Net) or a single, possibly 4D, file (MSD). nnU-Net
            paths are the expected ones and may not exist; the integrity check reports that.
        label: the label file (which may not exist), or None for unlabelled cases.
    """

    case_id: str
    images: tuple[Path, ...]
    label: Path | None


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset folder, normalised from either convention.

    Attributes:
        name: ``name`` from dataset.json, else the folder name.
        channel_names: the name of each input channel, index = channel.
        labels: label name → integer value, background included.
        file_ending: ".nii.gz" or ".nii".
        num_training: ``numTraining`` as declared in dataset.json.
        training: the training cases, sorted by case id.
        test: the test cases (``imagesTs``), without labels, sorted by case id.
    """

    root: Path
    name: str
    convention: Literal["nnunet", "msd"]
    channel_names: tuple[str, ...]
    labels: dict[str, int]
    file_ending: str
    num_training: int
    training: tuple[Case, ...]
    test: tuple[Case, ...]

    @property
    def label_names(self) -> dict[int, str]:
        """Label value → name, background included, sorted by value."""
        return {value: name for name, value in sorted(self.labels.items(), key=lambda x: x[1])}

    @property
    def foreground_labels(self) -> tuple[int, ...]:
        """The non-zero label values, ascending."""
        return tuple(sorted(v for v in self.labels.values() if v != 0))

    def network_channels(self) -> dict[str, int]:
        """The network arguments this dataset decides: one input per channel, output per label."""
        return {"in_channels": len(self.channel_names), "out_channels": len(self.labels)}


def load_dataset_json(root: str | Path) -> dict[str, Any]:
    """Read ``root/dataset.json`` as a dict.

    Raises:
        DatasetError: if the folder or the file is missing, or the file is not a JSON object.
    """
    root = Path(root)
    path = root / DATASET_JSON
    if not root.is_dir():
        raise DatasetError(root, "dataset folder does not exist")
    if not path.is_file():
        raise DatasetError(path, "missing (every dataset folder needs a dataset.json)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetError(path, f"invalid JSON: {error}") from error
    if not isinstance(meta, dict):
        raise DatasetError(path, "invalid: expected a JSON object at the top level")
    return meta


def detect_convention(meta: dict[str, Any]) -> Literal["nnunet", "msd"]:
    """Tell the convention of a dataset.json from its keys ("modality"/"training" mean MSD)."""
    if "channel_names" in meta or "file_ending" in meta:
        return "nnunet"
    if "modality" in meta or "training" in meta:
        return "msd"
    return "nnunet"


def parse_labels(meta: dict[str, Any], path: Path) -> dict[str, int]:
    """Label name → value, background (0) included, from a dataset.json's ``labels``.

    nnU-Net maps name → value, MSD value → name. A file holding little more than ``labels``
    is read as MSD when every entry maps to a name (a string).

    Raises:
        DatasetError: naming ``path``, when labels are missing or malformed.
    """
    if "labels" not in meta:
        raise DatasetError(path, "missing required key labels")
    labels = meta["labels"]
    msd = detect_convention(meta) == "msd" or (
        "channel_names" not in meta and "file_ending" not in meta
        and isinstance(labels, dict) and bool(labels)
        and all(isinstance(name, str) for name in labels.values()))
    return _msd_labels(labels, path) if msd else _nnunet_labels(labels, path)


def missing_keys(meta: dict[str, Any]) -> list[str]:
    """The keys the convention of ``meta`` requires that it lacks."""
    required = NNUNET_KEYS if detect_convention(meta) == "nnunet" else MSD_KEYS
    return [key for key in required if key not in meta]


def split_file_ending(name: str, endings: Sequence[str] = FILE_ENDINGS) -> tuple[str, str] | None:
    """Split a file name into (stem, ending) for the first matching ending, else None."""
    for ending in endings:
        if name.endswith(ending) and len(name) > len(ending):
            return name[: -len(ending)], ending
    return None


def read_dataset(root: str | Path) -> DatasetInfo:
    """Read a dataset folder in the nnU-Net v2 or MSD layout.

    Only dataset.json is opened; cases are discovered from file names (nnU-Net) or from the
    ``training``/``test`` lists (MSD). Image and label files are not opened or checked.

    Raises:
        DatasetError: if dataset.json is missing, not valid JSON, lacks required keys or has
            malformed entries. The message names the file.
    """
    root = Path(root)
    meta = load_dataset_json(root)
    path = root / DATASET_JSON
    missing = missing_keys(meta)
    convention = detect_convention(meta)
    if missing:
        style, needed = (("nnU-Net v2", NNUNET_KEYS) if convention == "nnunet"
                         else ("MSD", MSD_KEYS))
        raise DatasetError(path, f"missing required key(s) {', '.join(missing)} "
                                 f"(a {style} dataset.json needs {', '.join(needed)})")
    num_training = meta["numTraining"]
    if isinstance(num_training, bool) or not isinstance(num_training, int) or num_training < 0:
        raise DatasetError(path, f"numTraining must be a non-negative integer, "
                                 f"not {num_training!r}")
    name = str(meta.get("name") or root.name)
    if convention == "nnunet":
        channels = _channel_names(meta["channel_names"], "channel_names", path)
        labels = _nnunet_labels(meta["labels"], path)
        ending = meta["file_ending"]
        if ending not in FILE_ENDINGS:
            raise DatasetError(path, f"file_ending {ending!r} is not supported; use "
                                     f"{' or '.join(FILE_ENDINGS)}")
        training = _nnunet_cases(root, "imagesTr", "labelsTr", ending, len(channels))
        test = _nnunet_cases(root, "imagesTs", None, ending, len(channels))
    else:
        channels = _channel_names(meta["modality"], "modality", path)
        labels = _msd_labels(meta["labels"], path)
        training = _msd_training(root, meta["training"], path)
        test = _msd_test(root, meta.get("test"), path)
        first = next((c.images[0].name for c in training + test), "")
        ending = (split_file_ending(first) or ("", ".nii.gz"))[1]
    return DatasetInfo(root=root, name=name, convention=convention, channel_names=channels,
                       labels=labels, file_ending=ending, num_training=num_training,
                       training=training, test=test)


def _channel_names(value: Any, key: str, path: Path) -> tuple[str, ...]:
    """{"0": "CT", "1": "PET"} → ("CT", "PET"), requiring the keys 0..n-1."""
    if not isinstance(value, dict) or not value:
        raise DatasetError(path, f"{key} must be a non-empty object like {{\"0\": \"CT\"}}")
    try:
        by_index = {int(k): str(v) for k, v in value.items()}
    except (TypeError, ValueError) as error:
        raise DatasetError(path, f"{key} keys must be channel indices \"0\", \"1\", ...") from error
    if sorted(by_index) != list(range(len(by_index))):
        raise DatasetError(path, f"{key} keys must be 0..{len(by_index) - 1}, "
                                 f"found {sorted(by_index)}")
    return tuple(by_index[i] for i in range(len(by_index)))


def _nnunet_labels(value: Any, path: Path) -> dict[str, int]:
    """nnU-Net labels are name → integer value."""
    if not isinstance(value, dict) or not value:
        raise DatasetError(path, "labels must be a non-empty object like {\"background\": 0}")
    labels = {}
    for name, number in value.items():
        if isinstance(number, bool) or not isinstance(number, int) or number < 0:
            raise DatasetError(path, f"label {name!r} has value {number!r}; only non-negative "
                                     "integers are supported (no region-based labels)")
        labels[str(name)] = number
    return _validated_labels(labels, path)


def _msd_labels(value: Any, path: Path) -> dict[str, int]:
    """MSD labels are value (a string) → name; return name → value."""
    if not isinstance(value, dict) or not value:
        raise DatasetError(path, "labels must be a non-empty object like {\"0\": \"background\"}")
    labels = {}
    for number, name in value.items():
        try:
            integer = int(number)
        except (TypeError, ValueError) as error:
            raise DatasetError(path, f"label key {number!r} is not an integer (MSD labels map "
                                     "value → name)") from error
        if integer < 0:
            raise DatasetError(path, f"label value {integer} is negative")
        if str(name) in labels:
            raise DatasetError(path, f"label name {name!r} is used twice")
        labels[str(name)] = integer
    return _validated_labels(labels, path)


def _validated_labels(labels: dict[str, int], path: Path) -> dict[str, int]:
    """Require distinct, consecutive values from background (0) on."""
    values = list(labels.values())
    if len(set(values)) != len(values):
        raise DatasetError(path, f"labels has repeated values: {labels}")
    if 0 not in values:
        raise DatasetError(path, "labels must include background with value 0")
    if sorted(values) != list(range(len(values))):
        # the network has one output channel per label, indexed by the label's value
        raise DatasetError(path, f"label values must be consecutive, 0 to {len(values) - 1} "
                                 f"(as nnU-Net requires), got {sorted(values)}; renumber them in "
                                 "dataset.json and the label files")
    return labels


def _nnunet_cases(root: Path, images_dir: str, labels_dir: str | None, ending: str,
                  n_channels: int) -> tuple[Case, ...]:
    """Cases of an nnU-Net images folder: every CASE_XXXX file names a case."""
    folder = root / images_dir
    if not folder.is_dir():
        return ()
    case_ids = set()
    for file in folder.iterdir():
        if file.name.startswith(".") or not file.is_file():
            continue
        parts = split_file_ending(file.name, (ending,))
        match = CHANNEL_SUFFIX.match(parts[0]) if parts else None
        if match:
            case_ids.add(match["case"])
    return tuple(
        Case(case_id=case_id,
             images=tuple(folder / f"{case_id}_{c:04d}{ending}" for c in range(n_channels)),
             label=root / labels_dir / f"{case_id}{ending}" if labels_dir else None)
        for case_id in sorted(case_ids))


def _msd_path(root: Path, entry: Any, where: str, path: Path) -> Path:
    """Resolve an MSD path like "./imagesTr/x.nii.gz" against the dataset root."""
    if not isinstance(entry, str) or not entry:
        raise DatasetError(path, f"{where} must be a file path, not {entry!r}")
    return root / Path(entry)


def _msd_case_id(file: Path) -> str:
    parts = split_file_ending(file.name)
    return parts[0] if parts else file.name


def _msd_training(root: Path, entries: Any, path: Path) -> tuple[Case, ...]:
    """Cases of the MSD ``training`` list of {"image": ..., "label": ...}."""
    if not isinstance(entries, list):
        raise DatasetError(path, "training must be a list of {\"image\": ..., \"label\": ...}")
    cases = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise DatasetError(path, f"training[{i}] must have \"image\" and \"label\" entries")
        image = _msd_path(root, entry["image"], f"training[{i}].image", path)
        label = _msd_path(root, entry["label"], f"training[{i}].label", path)
        cases.append(Case(case_id=_msd_case_id(image), images=(image,), label=label))
    return _sorted_unique(cases, path)


def _msd_test(root: Path, entries: Any, path: Path) -> tuple[Case, ...]:
    """Cases of the MSD ``test`` list, or of the files in imagesTs when there is no list."""
    if entries is None:
        folder = root / "imagesTs"
        files = sorted(f for f in folder.iterdir() if not f.name.startswith(".")
                       and split_file_ending(f.name)) if folder.is_dir() else []
    elif isinstance(entries, list):
        files = []
        for i, entry in enumerate(entries):
            if isinstance(entry, dict):  # some MSD derivatives write {"image": ...}
                entry = entry.get("image")
            files.append(_msd_path(root, entry, f"test[{i}]", path))
    else:
        raise DatasetError(path, "test must be a list of image paths")
    return _sorted_unique([Case(_msd_case_id(f), (f,), None) for f in files], path)


def _sorted_unique(cases: list[Case], path: Path) -> tuple[Case, ...]:
    """Sort cases by id, rejecting repeated ids."""
    ids = [c.case_id for c in cases]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise DatasetError(path, f"case id(s) found more than once: {', '.join(repeated)}")
    return tuple(sorted(cases, key=lambda c: c.case_id))


def find_case_files(paths: Sequence[str | Path], n_channels: int | None = None,
                    file_endings: Sequence[str] = FILE_ENDINGS) -> list[Case]:
    """Group loose image files (e.g. inputs to predict) into cases, unlabelled, sorted by id.

    Folders among ``paths`` are expanded to the files they hold with one of ``file_endings``
    (not recursively). Files named ``CASE_0000``, ``CASE_0001``, ... (nnU-Net style) become one
    case with one image per channel; a file without the ``_NNNN`` suffix is a case of its own
    (a single-channel image, or a 4D image with the channels on the last axis).

    ``n_channels`` are the channels the consumer expects. With 1, every file is a case of its
    own (``x_0000`` → case ``x``; several ``x_NNNN`` files → cases ``x_NNNN``). With more, every
    suffixed group must have exactly that many channel files.

    Raises:
        DatasetError: for a missing path, a file that is not an image, an empty result,
            a channel group with gaps, or case ids that collide.
    """
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files.extend(sorted(f for f in path.iterdir() if f.is_file()
                                and not f.name.startswith(".")
                                and split_file_ending(f.name, file_endings)))
        elif path.is_file():
            if not split_file_ending(path.name, file_endings):
                raise DatasetError(path, f"not an image file (expected {', '.join(file_endings)})")
            files.append(path)
        else:
            raise DatasetError(path, "does not exist")
    if not files:
        raise DatasetError(Path(paths[0]) if paths else Path("."),
                           f"no image files ({', '.join(file_endings)}) found")

    singles: list[Case] = []
    groups: dict[str, dict[int, Path]] = {}
    for file in files:
        stem = split_file_ending(file.name, file_endings)[0]  # type: ignore[index]
        match = CHANNEL_SUFFIX.match(stem)
        if match is None:
            singles.append(Case(stem, (file,), None))
            continue
        channels = groups.setdefault(match["case"], {})
        index = int(match["channel"])
        if index in channels:
            raise DatasetError(file, f"same case and channel as {channels[index]}")
        channels[index] = file

    cases = list(singles)
    for case_id, channels in sorted(groups.items()):
        indices = sorted(channels)
        if n_channels == 1 or (n_channels is None and indices[0] != 0):
            if len(indices) == 1 and indices[0] == 0:
                cases.append(Case(case_id, (channels[0],), None))
            else:
                cases.extend(Case(f"{case_id}_{i:04d}", (channels[i],), None) for i in indices)
            continue
        if indices != list(range(len(indices))):
            missing = sorted(set(range(indices[-1] + 1)) - set(indices))
            raise DatasetError(channels[indices[0]].parent,
                               f"case {case_id} lacks channel file(s) "
                               f"{', '.join(f'{case_id}_{i:04d}' for i in missing)}")
        if n_channels is not None and len(indices) != n_channels:
            raise DatasetError(channels[0].parent,
                               f"case {case_id} has {len(indices)} channel file(s) but "
                               f"{n_channels} are expected")
        cases.append(Case(case_id, tuple(channels[i] for i in indices), None))
    return list(_sorted_unique(cases, Path(files[0]).parent))
