"""The dicts that flow through the MONAI chains: a case's first item, batches of whole volumes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from monai.data import list_data_collate

from segmentation.data.layout import Case
from segmentation.data.patches import CLASS_LOCATIONS


def case_item(case: Case) -> dict[str, Any]:
    """The dict a MONAI transform chain starts from: file names and the case id."""
    images = [str(p) for p in case.images]
    item: dict[str, Any] = {"image": images if len(images) > 1 else images[0],
                            "case_id": case.case_id}
    if case.label is not None:
        item["label"] = str(case.label)
    return item


def collate_volumes(volumes: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """MONAI's collation of whole volumes, without their ``class_locations`` (crops only)."""
    return list_data_collate([{k: v for k, v in volume.items() if k != CLASS_LOCATIONS}
                              for volume in volumes])
