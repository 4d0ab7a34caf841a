"""Per-case Dice with nnU-Net's handling of empty classes."""

from __future__ import annotations

import math

import pytest
import torch

from segmentation.evaluation.metrics import case_metrics, mean_per_class


def logits_of(prediction: torch.Tensor, classes: int) -> torch.Tensor:
    """(B, K, *S) logits whose argmax is the (B, 1, *S) label map ``prediction``."""
    return torch.nn.functional.one_hot(prediction[:, 0], classes).movedim(-1, 1).float()


def test_dice_is_zero_for_a_predicted_class_absent_from_the_label_and_nan_if_absent_from_both():
    label = torch.zeros(2, 1, 6, 6, dtype=torch.long)
    label[:, :, :3, :3] = 1                    # class 1 in both cases; 2 and 3 in neither
    prediction = label.clone()
    prediction[0, :, 4:, 4:] = 2               # case 0 predicts class 2, which is not there
    dice = case_metrics(logits_of(prediction, 4), label)["dice"]   # (B, K − 1)
    assert dice.shape == (2, 3)
    assert dice[0, 0] == 1.0 and dice[1, 0] == 1.0
    assert dice[0, 1] == 0.0                   # a false positive counts as a miss
    assert math.isnan(dice[1, 1])              # neither label nor prediction: left out
    assert math.isnan(dice[0, 2]) and math.isnan(dice[1, 2])
    # so the false positive lowers the mean of class 2 instead of disappearing
    rows = [{"case_id": f"c{i}", "dice": dice[i].tolist()} for i in range(2)]
    means = mean_per_class(rows, "dice", ["organ", "vessel", "lesion"])
    assert means["organ"] == 1.0 and means["vessel"] == 0.0 and math.isnan(means["lesion"])


def test_dice_of_a_partly_found_class_is_the_usual_overlap():
    label = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    label[..., :2, :] = 1                      # 8 voxels
    prediction = torch.zeros_like(label)
    prediction[..., :1, :] = 1                 # 4 of them
    dice = case_metrics(logits_of(prediction, 2), label)["dice"]
    assert dice.tolist() == [[pytest.approx(2 * 4 / (8 + 4))]]
