"""Experiment planning: a dataset's fingerprint → nnU-Net-style 3D and 2D U-Net plans → configs.

``segmentation plan DATASET`` (:mod:`~segmentation.planning.commands`) reads every training
case's spacing and shape once (:mod:`~segmentation.planning.fingerprint`), plans the target
spacing, patch, batch and network with nnU-Net v2's default rules
(:mod:`~segmentation.planning.spacing`, :mod:`~segmentation.planning.topology`,
:mod:`~segmentation.planning.rules`) against a GPU memory budget
(:mod:`~segmentation.planning.memory`) and writes one training config per network
(:mod:`~segmentation.planning.config_writer`).
"""

from segmentation.planning.fingerprint import CaseFingerprint, Fingerprint, extract_fingerprint
from segmentation.planning.rules import ConfigurationPlan, DatasetPlan, plan_dataset

__all__ = ["CaseFingerprint", "ConfigurationPlan", "DatasetPlan", "Fingerprint",
           "extract_fingerprint", "plan_dataset"]
