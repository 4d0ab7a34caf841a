"""SegmentationDataModule: a dataset folder → checked, split, preprocessed, patched batches."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
from monai.data import CacheDataset, DataLoader, Dataset, PersistentDataset
from monai.transforms import Compose
from torch import nn
from torch.utils.data import Dataset as TorchDataset

from segmentation.atomic import write_text_atomic
from segmentation.data.augmentation_settings import AUGMENT_ON, AugmentationSettings
from segmentation.data.batch_augmentation import BatchAugmentation
from segmentation.data.cache_keys import file_state_hash, passed_check_marker, volume_cache_dir
from segmentation.data.check import check_dataset
from segmentation.data.fitted_preprocessing import load_or_fit_preprocessing
from segmentation.data.items import case_item, collate_volumes
from segmentation.data.layout import Case, DatasetInfo, find_case_files, read_dataset
from segmentation.data.patches import (
    SPATIAL,
    ClassLocationsd,
    RandomPatches,
    collate_windows,
    patch_transforms,
)
from segmentation.data.preprocessing import Preprocessing
from segmentation.data.slices import RandomSlices
from segmentation.data.splits import ALL_FOLD, check_fold, fold_cases, load_or_create_splits

CACHES = ("memory", "disk", "none")


class SegmentationDataModule(pl.LightningDataModule):
    """Dataset in the MSD / nnU-Net layout → training patches, validation volumes, predictions.

    Args:
        root: dataset folder (dataset.json, imagesTr/, labelsTr/, optional imagesTs/).
        fold: which fold of the k-fold split validates, or "all": train on every case
            without validation (nnU-Net's fold "all"; also for datasets too small to split).
        n_folds: folds of the split (written once to ``root/splits.json`` and reused).
        patch_size: requested training patch size (network input). With a network attached,
            it must be a size the network accepts (its error names the nearest valid ones).
        batch_size: patches per training batch.
        patches_per_epoch: training patches per epoch (nnU-Net: 250 batches).
        cache: "memory" (CacheDataset: fastest; every DDP rank holds a copy), "disk"
            (PersistentDataset: one shared on-disk copy, for DDP and large datasets) or "none".
        cache_dir: folder for the "disk" cache, passed checks and fitted preprocessing, each
            keyed so that nothing stale is read (:mod:`segmentation.data.cache_keys`).
        spacing: "median" (of the training cases), explicit spacing, or null (keep).
        normalization: "ct", "zscore", "minmax" or "none".
        orientation: axis codes scans are reoriented to.
        crop_foreground: crop scans to their non-zero bounding box; "zscore" then uses the
            non-zero voxels only (zeros stay 0), as nnU-Net.
        foreground_fraction: share of patches forced to show foreground.
        augment: random augmentation of training patches.
        augment_on: where it runs: "cpu" (per patch, MONAI's transforms, in the loader
            workers), "device" (batched on the training device after transfer: the workers only
            cut windows; :mod:`segmentation.data.batch_augmentation`) or "auto" (the device when
            training on a GPU, else the CPU). In 2D slice mode "cpu" uses albumentations and
            "device" the same batched path as 3D.
        augmentation: probabilities and ranges of the augmentation, any fields of
            :class:`~segmentation.data.augmentation_settings.AugmentationSettings` (the rest
            keep nnU-Net's defaults), e.g. ``{rotation_probability: 0.3}``; both places read
            them.
        slice_axis: 2D slice mode: train a 2D network on slices along this axis of 3D volumes.
        check: run the integrity check before anything else (stops on errors).
        preprocessing: fitted preprocessing to reuse (from a checkpoint) instead of fitting.
        predict_files: files or folders to run ``predict`` on (default: the dataset's imagesTs).
        network: the network being trained; only its shape arithmetic is read (linked by the CLI
            from the model). Without one, label patches have the image patch size.
    """

    def __init__(
        self,
        root: str,
        fold: int | Literal["all"] = 0,
        n_folds: int = 5,
        split_seed: int = 0,
        patch_size: Sequence[int] = (64, 64, 64),
        batch_size: int = 2,
        patches_per_epoch: int = 500,
        num_workers: int = 2,
        cache: str = "memory",
        cache_dir: str = ".cache/segmentation",
        spacing: Sequence[float] | str | None = "median",
        normalization: str = "zscore",
        orientation: str = "RAS",
        crop_foreground: bool = False,
        foreground_fraction: float = 1 / 3,
        augment: bool = True,
        augment_on: str = "auto",
        augmentation: dict[str, Any] | None = None,
        slice_axis: int | None = None,
        check: bool = True,
        preprocessing: dict[str, Any] | None = None,
        predict_files: list[str] | None = None,
        network: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if cache not in CACHES:
            raise ValueError(f"cache={cache!r} is not supported; choose one of {', '.join(CACHES)}")
        check_fold(fold, n_folds)
        for name, value, least in (("batch_size", batch_size, 1),
                                   ("patches_per_epoch", patches_per_epoch, 1),
                                   ("num_workers", num_workers, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"data.{name}={value!r}: choose a whole number >= {least}")
        if augment_on not in AUGMENT_ON:
            raise ValueError(f"data.augment_on={augment_on!r} is not supported; choose one of "
                             f"{', '.join(AUGMENT_ON)}")
        if not 0 <= foreground_fraction <= 1:
            raise ValueError(f"data.foreground_fraction={foreground_fraction}: choose a share "
                             "between 0 and 1 (nnU-Net: 0.33)")
        self.root = Path(root)
        self.fold, self.n_folds, self.split_seed = fold, n_folds, split_seed
        self.batch_size, self.patches_per_epoch = batch_size, patches_per_epoch
        self.num_workers, self.cache, self.cache_dir = num_workers, cache, Path(cache_dir)
        self.spacing, self.normalization, self.orientation = spacing, normalization, orientation
        self.crop_foreground, self.foreground_fraction = crop_foreground, foreground_fraction
        self.augment, self.slice_axis, self.check = augment, slice_axis, check
        self.augment_on = augment_on
        self.augmentation = AugmentationSettings.from_value(augmentation)
        self.batch_augmentation: BatchAugmentation | None = None  # set by train_dataloader
        self._host_spatial: np.ndarray | None = None  # the batch in transfer's draws
        self.preprocessing = Preprocessing.from_dict(preprocessing) if preprocessing else None
        self.predict_files = predict_files
        self.input_size = tuple(int(s) for s in patch_size)
        self.output_size = self.input_size
        if network is not None and hasattr(network, "output_shape"):
            self.output_size = tuple(network.output_shape(self.input_size))
        self.info: DatasetInfo | None = None
        self.train_cases: list[Case] = []
        self.val_cases: list[Case] = []
        self.predict_transform: Compose | None = None  # set by predict_dataloader

    # ------------------------------------------------------------------ setup
    def prepare_data(self) -> None:
        """Check the dataset and write its split (once, on one process).

        The check decodes every file, minutes for a large dataset, so a pass is remembered
        under ``cache_dir`` for exactly these files (paths, sizes, modification times): a run
        on an unchanged dataset skips it, a changed file makes it run again.
        """
        marker = passed_check_marker(self.root, self.cache_dir) if self.check else None
        if self.check and (marker is None or not marker.exists()):
            report = check_dataset(self.root)
            if not report.ok:
                more = len(report.errors) - 1
                also = (f" (and {more} more problem(s): `segmentation data check {self.root}` "
                        "lists them)" if more else "")
                raise ValueError(f"dataset {self.root} failed its integrity check: "
                                 f"{report.errors[0]}{also}")
            if marker is not None:
                marker.parent.mkdir(parents=True, exist_ok=True)
                write_text_atomic("passed\n", marker)
        if self.fold != ALL_FOLD:
            info = read_dataset(self.root)
            load_or_create_splits(self.root, [c.case_id for c in info.training], self.n_folds,
                                  self.split_seed)

    def setup(self, stage: str | None = None) -> None:
        """Read the split, fit the preprocessing to the training cases, build the datasets."""
        if self.info is not None:
            return
        self.info = read_dataset(self.root)
        by_id = {c.case_id: c for c in self.info.training}
        if self.fold == ALL_FOLD:
            train_ids, val_ids = sorted(by_id), []
        else:
            splits = load_or_create_splits(self.root, list(by_id), self.n_folds, self.split_seed)
            train_ids, val_ids = fold_cases(splits, self.fold)
        self.train_cases = [by_id[i] for i in train_ids]
        self.val_cases = [by_id[i] for i in val_ids]
        volume_dims = 3 if self.slice_axis is not None else len(self.input_size)
        if self.preprocessing is None:
            # fitted once per fold and files, then read from cache_dir/fingerprints
            self.preprocessing = load_or_fit_preprocessing(
                self.root, self.cache_dir, self.train_cases, spatial_dims=volume_dims,
                normalization=self.normalization, spacing=self.spacing,
                orientation=self.orientation, crop_foreground=self.crop_foreground)

    @property
    def label_names(self) -> dict[int, str]:
        """Label value → name, background included (after :meth:`setup`)."""
        if self.info is None:
            self.setup()
        return dict(self.info.label_names)

    def volumes(self, cases: Sequence[Case]) -> TorchDataset:
        """Preprocessed whole volumes of ``cases``, cached as configured.

        Each holds ``image`` (C, *S), ``label`` (1, *S) and the label's ``class_locations``
        (recorded once, with the cached volume, for forced-foreground crops). Training and
        validation volumes share one chain, so a disk cache serves both.
        """
        items = [case_item(c) for c in cases]
        preprocessing = self.preprocessing.transforms(("image", "label"),
                                                      max_label=max(self.info.labels.values()))
        # one flat chain: the caches keep everything before the first Randomizable step, and a
        # nested Compose is one
        transform = Compose([*preprocessing.transforms, ClassLocationsd("label")])
        if self.cache == "memory":
            return CacheDataset(items, transform, num_workers=self.num_workers or None,
                                progress=False)
        if self.cache == "disk":
            return PersistentDataset(items, transform, cache_dir=self.cache_key_dir(),
                                     hash_func=file_state_hash)
        return Dataset(items, transform)

    def cache_key_dir(self) -> Path:
        """Disk-cache folder of the volumes (:func:`volume_cache_dir`)."""
        return volume_cache_dir(self.root, self.cache_dir, self.preprocessing)

    # ------------------------------------------------------------------ loaders
    def train_generator(self) -> torch.Generator:
        """The training loader's random generator, distinct per DDP rank.

        MONAI's DataLoader seeds the random transforms from the loader's generator (in the
        main process without workers, through each worker's seed with them) and installs its
        own ``worker_init_fn``, so Lightning's rank-aware worker seeding never applies. Without
        this generator every rank of a seeded run would draw the same crops and augmentations.
        Its seed mixes ``torch.initial_seed()`` (set by ``seed_everything``) with the trainer's
        global rank (0 without a trainer), so seeded runs stay reproducible.
        """
        return torch.Generator().manual_seed(self.rank_seed())

    def rank_seed(self, purpose: str = "") -> int:
        """A seed from ``torch.initial_seed()``, the DDP rank and what it is for.

        The loader's generator uses ``purpose=""``; the device augmentation its own purpose, so
        the two random streams are independent.
        """
        rank = int(self.trainer.global_rank) if self.trainer is not None else 0
        entropy = [torch.initial_seed(), rank, *(ord(c) for c in purpose)]
        return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0])

    def augments_on_device(self) -> bool:
        """Whether training batches are augmented on the device (``augment_on``, resolved).

        "auto" picks the device when the trainer trains on a GPU (any accelerator but the CPU).
        """
        if not self.augment or self.augment_on == "cpu":
            return False
        if self.augment_on == "device":
            return True
        return self._training_device_type() != "cpu"

    def _training_device_type(self) -> str:
        """"cuda", "cpu", ... of the trainer's root device ("cpu" without a trainer)."""
        strategy = getattr(self.trainer, "strategy", None)
        return getattr(getattr(strategy, "root_device", None), "type", "cpu")

    def train_dataloader(self) -> DataLoader:
        """Batches {"image": (B, C, *input_size), "label": (B, 1, *output_size)}.

        With device augmentation the loader gives windows instead (see
        :meth:`augments_on_device`): lists of B windows, each patch's own size, and their
        rotations and scalings, which :meth:`on_before_batch_transfer` keeps on the host and
        :meth:`on_after_batch_transfer` applies, cutting to those shapes on the device.

        Lightning re-creates the loader with a DistributedSampler under DDP from the arguments
        given here, the rank's ``generator`` included.
        """
        volumes = self.volumes(self.train_cases)
        generator = self.train_generator()
        self.batch_augmentation = None
        if self.augments_on_device():
            self.batch_augmentation = BatchAugmentation(
                self.augmentation, self.input_size, self.output_size,
                seed=self.rank_seed("device augmentation"))
        on_device = self.batch_augmentation is not None
        if self.slice_axis is not None:
            patches: TorchDataset = RandomSlices(
                volumes, self.slice_axis, self.input_size, self.output_size,
                self.patches_per_epoch, foreground_fraction=self.foreground_fraction,
                augment=self.augment, seed=self.split_seed, settings=self.augmentation,
                on_device=on_device)
        else:
            transform = patch_transforms(len(self.input_size), self.input_size, self.output_size,
                                         foreground_fraction=self.foreground_fraction,
                                         augment=self.augment, settings=self.augmentation,
                                         on_device=on_device)
            patches = RandomPatches(volumes, transform, self.patches_per_epoch)
        pin = self._training_device_type() == "cuda"
        collate = {"collate_fn": collate_windows} if self.batch_augmentation else {}
        return DataLoader(patches, batch_size=self.batch_size, shuffle=True,
                          num_workers=self.num_workers, drop_last=False,
                          persistent_workers=self.num_workers > 0, pin_memory=pin,
                          generator=generator, **collate)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Keep a training batch's rotation and scaling on the host (device augmentation).

        The windows' draws stay where they were made: reading them back from the GPU would
        make the host wait for it.
        """
        if (self.batch_augmentation is not None and isinstance(batch, dict)
                and SPATIAL in batch):
            batch = dict(batch)
            self._host_spatial = np.asarray(batch.pop(SPATIAL), dtype=np.float64)
        return batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Augment a training batch of windows on its device (device augmentation only).

        Args:
            batch: {"image": B (C, *window_b), "label": B (1, *window_b)} on the device, each
                patch's window of its own size (:class:`AugmentationWindowCropd`).
            dataloader_idx: unused.

        Returns:
            {"image": (B, C, *input_size), "label": (B, 1, *output_size)}; batches of
            validation, test and predict pass unchanged. The image has the dtype the trainer's
            precision gives inputs (float16 for "16-true"; the augmentation computes in
            float32).
        """
        trainer = self.trainer
        if (self.batch_augmentation is None or trainer is None or not trainer.training
                or not isinstance(batch, dict) or self._host_spatial is None):
            return batch
        image, label = self.batch_augmentation(batch["image"], batch["label"],
                                               spatial=self._host_spatial)
        self._host_spatial = None
        image = trainer.precision_plugin.convert_input(image)
        return {**batch, "image": image, "label": label}

    def val_dataloader(self) -> DataLoader:
        """Whole preprocessed volumes, one per batch: image (1, C, *S), label (1, 1, *S)."""
        return DataLoader(self.volumes(self.val_cases), batch_size=1,
                          num_workers=self.num_workers, collate_fn=collate_volumes)

    def test_dataloader(self) -> DataLoader:
        """The validation fold's volumes (held out from training), as for validation.

        Raises:
            ValueError: with fold "all", which holds no case out of training.
        """
        if self.fold == ALL_FOLD:
            raise ValueError(f"data.fold={ALL_FOLD!r} holds no case out of training, so there "
                             "is nothing to test; test a numbered fold, or segment held-out "
                             "scans with `segmentation infer` and score them with `evaluate`")
        return self.val_dataloader()

    def predict_cases(self) -> list[Case]:
        """The scans ``predict`` segments: ``predict_files``, or the dataset's imagesTs.

        Raises:
            ValueError: if there is none.
        """
        if self.info is None:
            self.setup("predict")
        if self.predict_files:
            cases = find_case_files(self.predict_files, n_channels=len(self.info.channel_names))
        else:
            cases = list(self.info.test)
        if not cases:
            raise ValueError(f"nothing to predict: {self.root}/imagesTs is empty and no "
                             "data.predict_files were given")
        return cases

    def predict_dataloader(self) -> DataLoader:
        """Preprocessed scans without labels, one per batch: image (1, C, *S) and case_id.

        Each image keeps its metadata and applied operations, so a prediction can be mapped
        back onto the scan's own grid by inverting ``predict_transform``, the very chain that
        made it (MONAI inverts only with the transform objects that were applied).
        """
        items = [case_item(c) for c in self.predict_cases()]
        self.predict_transform = self.preprocessing.transforms(("image",))
        return DataLoader(Dataset(items, self.predict_transform), batch_size=1,
                          num_workers=self.num_workers)
