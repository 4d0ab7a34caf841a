"""Segmenting scans with a checkpoint: load → preprocess → predict → invert → write.

Everything about the model comes from the checkpoint: the network, the preprocessing fitted at
training time, the label names and the patch size. Predictions are mapped back onto each scan
by inverting the preprocessing (MONAI's invertible Orientation and Spacing), so the written
mask has the scan's exact shape, affine and orientation.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from torch import nn

from segmentation.atomic import write_text_atomic
from segmentation.data.layout import Case
from segmentation.data.preprocessing import Preprocessing
from segmentation.inference.predictor import PRECISIONS, Predictor
from segmentation.inference.writer import like_reference, save_atomic
from segmentation.training.checkpoint import load_module

# Stitch the logits on the CPU when their buffer would take more than this share of the free GPU
# memory: the rest is needed by the network's activations, the Gaussian weights and the TTA sum.
_GPU_BUFFER_FRACTION = 0.25


def resolve_device(device: str) -> torch.device:
    """"auto" → cuda when available, else cpu; "cuda" without a GPU is an error.

    Raises:
        ValueError: for a name other than auto, cpu, cuda or cuda:N, or cuda without a GPU.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise ValueError(f"--device {device}: choose auto, cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no GPU is available; use auto or cpu")
    return torch.device(device)


def available_gpu_memory(device: torch.device) -> int:
    """Bytes this process can still allocate on ``device``.

    The card's free memory plus what our allocator holds unused, within any
    ``torch.cuda.set_per_process_memory_fraction`` cap.
    """
    index = device.index if device.index is not None else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    allocated = torch.cuda.memory_allocated(index)
    cached = torch.cuda.memory_reserved(index) - allocated
    cap = int(torch.cuda.get_per_process_memory_fraction(index) * total) - allocated
    return max(min(free + cached, cap), 0)


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" → "bf16" on a GPU that supports it, "fp16" on an older GPU, "fp32" on the CPU."""
    if precision == "auto":
        if device.type != "cuda":
            return "fp32"
        # native bf16 from Ampere (compute capability 8) on; is_bf16_supported() also counts
        # emulation, which is slow on V100/T4
        return "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"
    if precision not in PRECISIONS:
        *first, last = PRECISIONS
        raise ValueError(f"--precision {precision}: choose auto, {', '.join(first)} or {last}")
    return precision


def sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class CaseResult:
    """What happened to one scan."""

    case_id: str
    inputs: list[str]
    outputs: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0


class Segmenter:
    """A trained model ready to segment scans.

    Args:
        checkpoint: a training checkpoint (it describes itself).
        overlap: sliding-window overlap ("same" networks); default: as trained.
        tta: mirror test-time augmentation over all spatial axes.
        device: "auto", "cpu" or "cuda".
        batch_size: windows per forward pass; default: as trained.
        precision: "auto" (bf16 autocast on a GPU that supports it, fp16 on older GPUs, fp32
            on the CPU), "fp32", "bf16" or "fp16"; logits are stitched in float32 either way.
        compile: run the network through ``torch.compile`` (static shapes): each new window
            shape compiles once (a minute or so for large networks on a GPU), later windows of
            that shape run fused kernels. Worth it for many scans; on the CPU it needs a C++
            compiler.
        note: receives one-line remarks for the user (e.g. "logits stitched on the CPU").
    """

    def __init__(self, checkpoint: str | Path, *, overlap: float | None = None,
                 tta: bool = False, device: str = "auto", batch_size: int | None = None,
                 precision: str = "auto", compile: bool = False,
                 note: Callable[[str], None] | None = None) -> None:
        if overlap is not None and not 0 <= overlap < 1:
            raise ValueError(f"--overlap {overlap}: choose a fraction in [0, 1), e.g. 0.5")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"--batch-size {batch_size}: choose 1 or more windows per pass")
        self.note = note or (lambda message: None)
        self.device = resolve_device(device)
        module = load_module(checkpoint, map_location="cpu")
        if not module.preprocessing or not module.hparams.patch_size:
            raise ValueError(f"{checkpoint}: the checkpoint lacks its preprocessing or patch "
                             "size; it was not written by `segmentation fit`")
        self.net = module.net.to(self.device).eval()
        # The compiled wrapper forwards attribute reads (padding, output_shape, ...) to the net,
        # so the Predictor treats it as the net itself. Compiled once here, reused by every scan.
        self.compile = compile
        self.network: nn.Module = torch.compile(self.net, dynamic=False) if compile else self.net
        if compile and self.device.type == "cpu":
            self.note("--compile on the CPU is usually slower than without (it pays off on a "
                      "GPU, where it fuses the norm and activation layers)")
        self.label_names = dict(module.label_names)
        self.preprocessing = Preprocessing.from_dict(module.preprocessing)
        self.transform = self.preprocessing.transforms(("image",))
        self.overlap = module.hparams.overlap if overlap is None else overlap
        self.batch_size = batch_size or module.hparams.sw_batch_size
        self.tta = tta
        self.precision = resolve_precision(precision, self.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # windows all have one shape: tune once
        self.patch_size = tuple(module.hparams.patch_size)
        self.slice_axis = module.hparams.slice_axis
        self.in_channels = getattr(self.net, "in_channels", None)
        self._predictor = Predictor(self.network, self.patch_size, overlap=self.overlap,
                                    batch_size=self.batch_size, mirror=self.tta,
                                    slice_axis=self.slice_axis, out_device=self.device,
                                    precision=self.precision, fixed_batch=compile)

    def predictor(self, voxels: int, classes: int, channels: int = 1) -> Predictor:
        """The whole-scan predictor, set to stitch on the CPU when the GPU would not hold it.

        One predictor serves every scan, so tiles chosen for earlier scans are reused.

        Args:
            voxels: voxels of the preprocessed scan.
            classes: K, the network's output channels.
            channels: C, the scan's channels.
        """
        out_device: torch.device | str = self.device
        if self.device.type == "cuda":
            free = available_gpu_memory(self.device)
            # float32 (K, *S) buffers at the peak: the logits (softmax is in place); with TTA
            # the running sum, one pass's logits and their flipped copy. Plus the Gaussian
            # normaliser, and the scan and its flipped copy.
            needed = (classes * (3 if self.tta else 1) + 1 + 2 * channels) * voxels * 4
            if needed > _GPU_BUFFER_FRACTION * free:
                out_device = "cpu"
                self.note(f"stitching buffers of {needed / 2**30:.1f} GiB would take more than "
                          f"{_GPU_BUFFER_FRACTION:.0%} of the free GPU memory "
                          f"({free / 2**30:.1f} GiB): stitching them on the CPU")
        self._predictor.out_device = out_device
        return self._predictor

    def probabilities(self, case: Case,
                      progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Class probabilities on the scan's own grid.

        Returns:
            (K, *S) float32 on the CPU, S the spatial shape of the case's first image file.
        """
        files = [str(p) for p in case.images]
        data = self.transform({"image": files if len(files) > 1 else files[0]})
        image: MetaTensor = data["image"]                                  # (C, *S')
        if self.in_channels is not None and image.shape[0] != self.in_channels:
            raise ValueError(f"{case.images[0]}: {image.shape[0]} channel(s), but the model "
                             f"expects {self.in_channels}")
        classes = getattr(self.net, "out_channels", len(self.label_names))
        predictor = self.predictor(int(np.prod(image.shape[1:])), classes, image.shape[0])
        with torch.inference_mode():
            logits = predictor(image.as_tensor()[None].to(self.device), progress)[0]  # (K, *S')
            if not torch.isfinite(logits.sum()):  # NaN and ±inf survive a sum: no (K, *S') mask
                advice = ("check the scan's intensities and the checkpoint"
                          if self.precision == "fp32"
                          else f"they overflowed in {self.precision}: rerun with --precision fp32")
                raise ValueError(f"{case.images[0]}: the network gave non-finite logits; {advice}")
            # softmax in place: a CT-sized scan's logits are gigabytes (float32, our own buffer)
            probabilities = logits.sub_(logits.amax(0, keepdim=True)).exp_()   # (K, *S')
            probabilities = probabilities.div_(probabilities.sum(0, keepdim=True)).cpu()
            del logits
            # Invert orientation and spacing on the probabilities with each transform's own
            # (linear) interpolation, then take the argmax: smoother, better-placed boundaries
            # than nearest-neighbour resampling of a label map.
            inverted = self.transform.inverse({"image": MetaTensor(
                probabilities, meta=image.meta, applied_operations=image.applied_operations)})
        return torch.as_tensor(inverted["image"]).float()                 # (K, *S)

    def segment(self, case: Case, output_dir: Path, *, save_probabilities: bool = False,
                progress: Callable[[int, int], None] | None = None) -> list[Path]:
        """Segment one case and write its files into ``output_dir``.

        Returns:
            The written paths: ``CASE.nii.gz`` (label map, uint8, uint16 beyond 255 labels) and,
            with ``save_probabilities``, ``CASE_probabilities.nii.gz`` ((*S, K) float32).
        """
        reference = nib.load(str(case.images[0]))
        probabilities = self.probabilities(case, progress)
        spatial = tuple(reference.shape[: probabilities.ndim - 1])
        if tuple(probabilities.shape[1:]) != spatial:
            raise ValueError(f"{case.images[0]}: the prediction mapped back onto the scan has "
                             f"shape {tuple(probabilities.shape[1:])}, the scan {spatial}; the "
                             "preprocessing could not be inverted exactly")
        labels = probabilities.argmax(0).numpy()
        dtype = np.uint8 if probabilities.shape[0] <= 256 else np.uint16
        written = [save_atomic(like_reference(labels.astype(dtype), reference),
                               output_dir / f"{case.case_id}.nii.gz")]
        if save_probabilities:
            channels_last = np.moveaxis(probabilities.numpy(), 0, -1).astype(np.float32)
            written.append(save_atomic(like_reference(channels_last, reference,
                                                      kind="probabilities"),
                                       output_dir / f"{case.case_id}_probabilities.nii.gz"))
        return written


def output_paths(case: Case, output_dir: Path, save_probabilities: bool) -> list[Path]:
    """The files :meth:`Segmenter.segment` writes for a case."""
    paths = [output_dir / f"{case.case_id}.nii.gz"]
    if save_probabilities:
        paths.append(output_dir / f"{case.case_id}_probabilities.nii.gz")
    return paths


def check_outputs(cases: Sequence[Case], output_dir: Path, *, save_probabilities: bool,
                  overwrite: bool) -> list[str]:
    """Problems that forbid writing: an output that is an input, or exists without overwrite."""
    inputs = [p for case in cases for p in case.images]
    resolved = {p.resolve() for p in inputs}
    problems = []
    for case in cases:
        for path in output_paths(case, output_dir, save_probabilities):
            # resolve() sees through symbolic links, samefile() also through hard links
            if path.resolve() in resolved or (path.exists() and any(
                    p.exists() and os.path.samefile(path, p) for p in inputs)):
                problems.append(f"{path}: is one of the input scans; choose another --output")
            elif path.exists() and not overwrite:
                problems.append(f"{path}: exists; pass --overwrite to replace it")
    return problems


def provenance(checkpoint: Path, settings: dict[str, Any], results: Sequence[CaseResult],
               started: float) -> dict[str, Any]:
    """Where the outputs came from: checkpoint hash, settings, versions, inputs and outputs."""
    import monai

    import segmentation

    return {
        "checkpoint": str(checkpoint.resolve()),
        "checkpoint_sha256": sha256(checkpoint),
        "settings": settings,
        "versions": {"segmentation": segmentation.__version__, "torch": torch.__version__,
                     "monai": monai.__version__, "nibabel": nib.__version__,
                     "numpy": np.__version__, "python": platform.python_version()},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime()),
        "seconds": round(time.time() - started, 3),
        "cases": [vars(r) for r in results],
    }


def write_provenance(output_dir: Path, record: dict[str, Any]) -> Path:
    """``provenance.json`` beside the outputs, written atomically."""
    return write_text_atomic(json.dumps(record, indent=2), output_dir / "provenance.json")
