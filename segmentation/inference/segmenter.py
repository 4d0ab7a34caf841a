"""A checkpoint → label files: load → preprocess → predict → invert → write.

Everything about the model comes from the checkpoint (see ``checkpoint.py``): the network, the
preprocessing fitted at training time, the label names and the patch size. Predictions are
mapped back onto each scan by inverting the preprocessing (MONAI's invertible Orientation and
Spacing), so the written mask has the scan's exact shape, affine and orientation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor

from segmentation.data.layout import Case
from segmentation.inference.checkpoint import CheckpointError, load_trained_network
from segmentation.inference.devices import (
    resolve_device,
    resolve_precision,
    stitching_buffer_bytes,
    stitching_device,
)
from segmentation.inference.ensemble import check_compatible
from segmentation.inference.predictor import Predictor
from segmentation.inference.restore import (
    check_finite,
    check_scan_dimensions,
    probabilities_on_scan,
    softmax_,
)
from segmentation.inference.writer import write_case


class Segmenter:
    """Trained models ready to segment scans (a :class:`Predictor` per model gives logits).

    One checkpoint segments on its own; several (e.g. the cross-validation folds, as nnU-Net
    does by default) form an ensemble: each model's softmax probabilities are summed into one
    buffer on the preprocessed grid (accumulated, never stacked per model), averaged, and
    mapped back onto the scan once. The resampling that maps them back is linear, so this
    equals the mean of the single models' maps on the scan's grid.

    Args:
        checkpoint: a training checkpoint (it describes itself), or several; they must agree
            on labels, channels and preprocessing (see ``ensemble.check_compatible``).
        overlap: sliding-window overlap ("same" networks); default: as trained (the first
            checkpoint's).
        tta: mirror test-time augmentation over all spatial axes.
        device: "auto", "cpu", "cuda" or "cuda:N".
        batch_size: windows per forward pass; default: as trained (the first checkpoint's).
        precision: "auto" (see :func:`resolve_precision`), "fp32", "bf16" or "fp16"; logits
            are stitched in float32 either way.
        compile: run the networks through ``torch.compile`` (static shapes): each new window
            shape compiles once, later windows of that shape run fused kernels. Worth it for
            many scans; on the CPU it needs a C++ compiler and is usually slower.
        note: receives one-line remarks for the user (e.g. "logits stitched on the CPU").

    Raises:
        ValueError: for a bad setting; CheckpointError (a ValueError) for a checkpoint that
            cannot be used, or checkpoints that cannot be averaged, naming the files.
    """

    def __init__(self, checkpoint: str | Path | Sequence[str | Path], *,
                 overlap: float | None = None, tta: bool = False, device: str = "auto",
                 batch_size: int | None = None, precision: str = "auto", compile: bool = False,
                 note: Callable[[str], None] | None = None) -> None:
        if overlap is not None and not 0 <= overlap < 1:
            raise ValueError(f"--overlap {overlap}: choose a fraction in [0, 1), e.g. 0.5")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"--batch-size {batch_size}: choose 1 or more windows per pass")
        self.note = note or (lambda message: None)
        self.device = resolve_device(device)
        self.checkpoints = ([Path(checkpoint)] if isinstance(checkpoint, str | Path)
                            else [Path(c) for c in checkpoint])
        if not self.checkpoints:
            raise ValueError("no checkpoint given")
        loaded = []
        for path in self.checkpoints:
            net, record = load_trained_network(path, map_location="cpu")
            if record.preprocessing is None or not record.patch_size:
                raise CheckpointError(f"{path}: the checkpoint lacks its preprocessing or "
                                      "patch size; it was not written by `segmentation fit`")
            loaded.append((net.to(self.device).eval(), record))
        check_compatible([(path, record) for path, (_, record)
                          in zip(self.checkpoints, loaded, strict=True)])
        record = loaded[0][1]
        self.nets = [net for net, _ in loaded]
        self.net = self.nets[0]
        if compile and self.device.type == "cpu":
            self.note("--compile on the CPU is usually slower than without (it pays off on a "
                      "GPU, where it fuses the norm and activation layers)")
        self.compile, self.tta = compile, tta
        self.label_names = dict(record.label_names or {})
        self.preprocessing = record.preprocessing
        self.transform = self.preprocessing.transforms(("image",))
        self.overlap = record.overlap if overlap is None else overlap
        self.batch_size = batch_size or record.batch_size
        self.precision = resolve_precision(precision, self.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # windows all have one shape: tune once
        self.patch_size = record.patch_size
        self.slice_axis = record.slice_axis
        self.in_channels: int | None = getattr(self.net, "in_channels", None)
        self.classes: int = getattr(self.net, "out_channels", len(self.label_names))
        # One predictor per model serves every scan, so tiles chosen for earlier scans are
        # reused. The compiled wrapper forwards attribute reads (padding, output_shape, ...) to
        # the net, so the predictor treats it as the net itself; it is compiled once, here.
        self.predictors = [
            Predictor(torch.compile(net, dynamic=False) if compile else net,
                      model_record.patch_size, overlap=self.overlap, batch_size=self.batch_size,
                      mirror=self.tta, slice_axis=self.slice_axis, out_device=self.device,
                      precision=self.precision, fixed_batch=compile)
            for net, model_record in loaded]
        self.predictor = self.predictors[0]

    def place_stitching(self, voxels: int, channels: int) -> None:
        """Stitch this scan's logits on the CPU when the GPU would not hold them (with a note).

        ``voxels`` and ``channels`` are those of the preprocessed scan.
        """
        needed = stitching_buffer_bytes(voxels, self.classes, channels, self.tta)
        if len(self.predictors) > 1:  # plus the ensemble's running sum of probabilities
            needed += voxels * self.classes * 4
        device, remark = stitching_device(self.device, needed)
        if remark:
            self.note(remark)
        for predictor in self.predictors:
            predictor.out_device = device

    def probabilities(self, case: Case,
                      progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """(K, *S) float32 class probabilities on the CPU, on the scan's own grid.

        S is the spatial shape of the case's first image file; with several models, the mean
        of their probabilities.
        """
        files = [str(p) for p in case.images]
        data = self.transform({"image": files if len(files) > 1 else files[0]})
        image: MetaTensor = data["image"]                                  # (C, *S')
        if self.in_channels is not None and image.shape[0] != self.in_channels:
            raise ValueError(f"{case.images[0]}: {image.shape[0]} channel(s), but the model "
                             f"expects {self.in_channels}")
        self.place_stitching(int(np.prod(image.shape[1:])), image.shape[0])
        with torch.inference_mode():
            total: torch.Tensor | None = None
            for predictor in self.predictors:
                logits = predictor(image.as_tensor()[None].to(self.device), progress)[0]
                check_finite(logits, case.images[0], self.precision)        # (K, *S')
                probabilities = softmax_(logits)                            # (K, *S')
                total = probabilities if total is None else total.add_(probabilities)
                del logits, probabilities
            mean = total.div_(len(self.predictors))                         # (K, *S')
            return probabilities_on_scan(mean, image, self.transform)       # (K, *S)

    def segment(self, case: Case, output_dir: Path, *, save_probabilities: bool = False,
                progress: Callable[[int, int], None] | None = None) -> list[Path]:
        """Segment one case and write its files (see ``writer.write_case``).

        Returns:
            The written paths: ``CASE.nii.gz`` (label map, uint8, uint16 beyond 256 classes)
            and, with ``save_probabilities``, ``CASE_probabilities.nii.gz`` ((*S, K) float32).
        """
        check_scan_dimensions(case.images[0], nib.load(str(case.images[0])).shape,
                              self.preprocessing.spatial_dims)
        probabilities = self.probabilities(case, progress)                # (K, *S)
        return write_case(probabilities, case, output_dir, save_probabilities=save_probabilities)
