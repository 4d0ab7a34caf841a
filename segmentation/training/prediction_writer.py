"""``segmentation predict`` writes files: one segmentation per scan, as ``segmentation infer`` does.

The predict step maps each scan's probabilities back onto the scan's own grid with infer's
restoration, and :class:`PredictionWriter` writes them with infer's writer (``write_case``):
the scan's shape, affine and codes, atomic writes, ``provenance.json``. Everything that would
stop the run (an existing output without ``overwrite``, an output that is an input, an
unwritable folder, a foreign provenance.json, a scan of the wrong dimensionality) is found by
:func:`check_prediction_outputs` before the trainer exists. Under DDP Lightning's predict loader
hands each process its own scans, none repeated, so every scan is written exactly once.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import pytorch_lightning as pl
from pytorch_lightning.callbacks import BasePredictionWriter

from segmentation.data.layout import Case
from segmentation.inference.outputs import check_outputs, prepare_output_dir
from segmentation.inference.provenance import CaseResult, append_run, read_runs, run_record
from segmentation.inference.restore import check_scan_dimensions
from segmentation.inference.writer import write_case
from segmentation.training.gather import gather_cases

PREDICTIONS_FOLDER = "predictions"  # default output folder, inside the predict run's folder


@dataclass
class PredictionSettings:
    """What ``segmentation predict`` writes, and where (``--prediction.*``).

    Args:
        output_dir: folder for the segmentations; default ``<run folder>/predictions``.
        save_probabilities: also write ``CASE_probabilities.nii.gz`` (classes on the last axis).
        overwrite: replace existing outputs (never the input scans).
    """

    output_dir: str | None = None
    save_probabilities: bool = False
    overwrite: bool = False


def check_prediction_outputs(cases: Sequence[Case], output_dir: Path, *,
                             save_probabilities: bool, overwrite: bool,
                             spatial_dims: int | None) -> None:
    """Refuse, before anything runs, what would stop ``predict`` half-way or lose a file.

    Creates ``output_dir`` and proves it writable; ``spatial_dims`` (the checkpoint's, when
    known) is checked against every scan's header.

    Raises:
        ValueError: one line: the first problem, and how many more there are.
    """
    problems = []
    if spatial_dims is not None:
        for case in cases:
            try:
                check_scan_dimensions(case.images[0], nib.load(str(case.images[0])).shape,
                                      spatial_dims)
            except ValueError as error:
                problems.append(str(error))
            except Exception as error:  # an unreadable header: nibabel's reason, with the file
                problems.append(f"{case.images[0]}: cannot be read as an image ({error})")
    folder = prepare_output_dir(output_dir)
    if folder:
        problems.append(folder.replace("--output", "--prediction.output_dir"))
    else:
        read_runs(output_dir)  # ProvenanceError (a ValueError) for a foreign provenance.json
        problems += [p.replace("--overwrite", "--prediction.overwrite true")
                      .replace("choose another --output", "choose another "
                               "--prediction.output_dir")
                     for p in check_outputs(cases, output_dir,
                                            save_probabilities=save_probabilities,
                                            overwrite=overwrite)]
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise ValueError(problems[0] + more)


class PredictionWriter(BasePredictionWriter):
    """Writes each predicted scan as it is done, and records the run in ``provenance.json``.

    Args:
        output_dir: an existing, checked folder (see :func:`check_prediction_outputs`).
        cases: the scans the predict loader yields, found by their ``case_id``.
        checkpoint: the ``--ckpt_path`` the weights came from (hashed into the record).
        settings: what the record lists as the run's settings.
        save_probabilities: also write the class probabilities.
    """

    def __init__(self, output_dir: Path, cases: Sequence[Case], checkpoint: str | Path, *,
                 settings: dict[str, Any], save_probabilities: bool = False) -> None:
        super().__init__(write_interval="batch")
        self.output_dir, self.checkpoint = Path(output_dir), Path(checkpoint)
        self.cases = {case.case_id: case for case in cases}
        self.settings, self.save_probabilities = settings, save_probabilities
        self.results: list[CaseResult] = []
        self.started = time.time()
        self._tick = time.monotonic()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Every process writes into the first process's folder.

        Processes that torchrun or SLURM start together each name the run's next version
        folder; one of them may already see the first one's, so the first one decides.
        """
        if stage == "predict":
            self.output_dir = Path(trainer.strategy.broadcast(str(self.output_dir), src=0))

    def on_predict_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                               batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Start the clock of the batch's scans."""
        self._tick = time.monotonic()

    def write_on_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           prediction: list[dict[str, Any]], batch_indices: Sequence[int] | None,
                           batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        """Write the batch's scans: {"case_id", "probabilities" (K, *S)} each."""
        for item in prediction:
            case = self.cases[item["case_id"]]
            written = write_case(item["probabilities"], case, self.output_dir,
                                 save_probabilities=self.save_probabilities)
            self.results.append(CaseResult(
                case.case_id, [str(p) for p in case.images], [str(p) for p in written],
                seconds=round(time.monotonic() - self._tick, 3)))

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Record the run (every process's scans) once, from the first process."""
        rows = gather_cases([vars(r) for r in self.results])  # a collective under DDP
        if trainer.is_global_zero:
            results = [CaseResult(**row) for row in rows]
            append_run(self.output_dir, {**run_record(self.checkpoint, self.settings, results,
                                                      self.started), "command": "predict",
                                         "processes": trainer.world_size})
            print(f"wrote {len(results)} segmentation(s) to {self.output_dir}", file=sys.stderr)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        """An interrupted run still records the scans it finished (the first process's own).

        Other processes' finished scans are on disk but not in the record: gathering them is
        a collective that a failing process may never reach.
        """
        if trainer.is_global_zero and self.results:
            append_run(self.output_dir, {**run_record(self.checkpoint, self.settings,
                                                      self.results, self.started),
                                         "command": "predict", "interrupted": True})
