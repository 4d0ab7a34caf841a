"""``segmentation fit|validate|test|predict``: LightningCLI with the network linked to the data.

The network's shape arithmetic reaches the data module through argument links (the label patch
is the network's ``output_shape`` of the image patch), the data module's patch size and slice
axis reach the model the same way, the network's input and output channels come from the
dataset's channels and labels, and every run gets its own versioned folder under
``runs/<name>/`` holding config.yaml, TensorBoard and CSV logs and checkpoints.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
from pytorch_lightning.callbacks.progress import ProgressBar as AnyProgressBar
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch import nn

from segmentation.data.datamodule import SegmentationDataModule
from segmentation.data.layout import read_dataset
from segmentation.data.splits import ALL_FOLD
from segmentation.inference.checkpoint import (
    RECORD_KEY,
    CheckpointError,
    CheckpointRecord,
    last_checkpoint_of_run,
    network_weights,
    read_checkpoint,
)
from segmentation.training.callbacks import LastCheckpoint, PeakMemory
from segmentation.training.module import SegmentationModule
from segmentation.training.prediction_writer import (
    PREDICTIONS_FOLDER,
    PredictionSettings,
    PredictionWriter,
    check_prediction_outputs,
)

SUBCOMMANDS = ("fit", "validate", "test", "predict")
LIGHTNING_VERSION_KEY = "pytorch-lightning_version"  # in every checkpoint Lightning writes
# The run's version folder, handed to the processes Lightning's DDP launcher starts (they
# inherit the environment), so every process of one run names the same folder.
RUN_VERSION_ENV = "SEGMENTATION_RUN_VERSION"


def namespace_to_dict(value: Any) -> Any:
    """A parsed jsonargparse value (Namespace) as plain data for hyperparameters."""
    if isinstance(value, Namespace):
        return {k: namespace_to_dict(v) for k, v in vars(value).items()}
    if isinstance(value, list | tuple):
        return [namespace_to_dict(v) for v in value]
    return value


def channels_from_dataset(config: Namespace) -> None:
    """Set the network's ``in_channels``/``out_channels`` from the dataset it will train on.

    The number of labels and channels belongs to the dataset (dataset.json); written into a
    network's YAML it is a copy that goes stale with the next dataset. Where ``data.root``
    holds a readable dataset and the network takes these arguments, they are taken from it
    (a changed value is reported on stderr) and the checkpoint's network description follows.
    Without a readable dataset (e.g. ``--print_config`` before the data exists) the configured
    values stay; the model refuses a mismatch once the data is there. ``config`` (the
    subcommand's parsed config) is changed in place.
    """
    try:
        info = read_dataset(config.data.root)
    except (OSError, ValueError):
        return
    init_args = getattr(config.model.net, "init_args", None)
    if init_args is None:
        return
    changed = {name: value for name, value in info.network_channels().items()
               if name in init_args and init_args[name] != value}
    for name, value in changed.items():
        what = "channels" if name == "in_channels" else "labels"
        _note(f"model.net.init_args.{name}: {init_args[name]} → {value}, the {what} of "
              f"{info.root}/dataset.json")
        init_args[name] = value
    if changed:
        config.model.net_config = namespace_to_dict(config.model.net)


@rank_zero_only
def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def next_version(run_dir: Path) -> str:
    """``version_N`` with N one above the highest existing version folder."""
    numbers = [int(p.name.split("_")[1]) for p in run_dir.glob("version_*")
               if p.name.split("_")[1].isdigit()]
    return f"version_{max(numbers, default=-1) + 1}"


def check_weights_fit(path: str | Path, weights: dict[str, Any], net: nn.Module) -> None:
    """Refuse the weights of a ``--ckpt_path`` written for another network.

    Lightning would find out only after the run folder exists, and with a long traceback.
    ``weights`` are the checkpoint's network weights (see ``network_weights``).

    Raises:
        CheckpointError: one line naming the file and the first mismatch.
    """
    own = net.state_dict()
    for key, tensor in own.items():
        if key not in weights:
            raise CheckpointError(f"{path}: written for another network (it has no weights "
                                  f"for net.{key}); pass the config.yaml of the run that wrote it")
        if tuple(weights[key].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{path}: written for another network (net.{key} has shape "
                                  f"{list(weights[key].shape)} there, {list(tensor.shape)} in "
                                  "model.net); pass the config.yaml of the run that wrote it")
    extra = sorted(set(weights) - set(own))
    if extra:
        raise CheckpointError(f"{path}: written for another network (net.{extra[0]} is not in "
                              "model.net); pass the config.yaml of the run that wrote it")


# The CSV logger shares the run folder with TensorBoard and config.yaml by design.
warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
# Lightning 2.6's own use of a torch 2.13 deprecation, printed at every fit; nothing to act on.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                        module=r"pytorch_lightning\.")


class _NoAdverts(logging.Filter):
    """Drops Lightning's "💡 Tip: try installing litlogger/litmodels" lines.

    They advertise cloud services; every other message of Lightning's stays.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_NoAdverts())


class SegmentationCLI(LightningCLI):
    """LightningCLI for SegmentationModule + SegmentationDataModule."""

    def __init__(self, args: Sequence[str] | None = None, **kwargs: Any) -> None:
        self._sets_version = RUN_VERSION_ENV not in os.environ  # False in DDP's child processes
        try:
            super().__init__(
                SegmentationModule, SegmentationDataModule, args=args,
                save_config_kwargs={"overwrite": False}, seed_everything_default=0, **kwargs)
        finally:
            if self._sets_version:  # the next run in this process gets a folder of its own
                os.environ.pop(RUN_VERSION_ENV, None)

    def _prepare_subcommand_parser(self, klass: type, subcommand: str,
                                   **kwargs: Any) -> LightningArgumentParser:
        """Each subcommand's parser; ``predict``'s also takes ``--prediction.*``."""
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "predict":
            parser.add_class_arguments(PredictionSettings, "prediction", instantiate=False)
        return parser

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Run naming and the links between network, data and model."""
        parser.add_argument("--name", type=str, default="run",
                            help="run name: runs go to <runs_dir>/<name>/version_N")
        parser.add_argument("--runs_dir", type=str, default="runs")
        parser.add_argument("--deterministic", type=bool, default=False,
                            help="deterministic algorithms (slower)")
        parser.add_argument("--checkpoint_every_n_steps", type=int, default=0,
                            help="also write last.ckpt every N steps (0: at epoch ends), so a "
                                 "killed or preempted run loses at most N steps")
        parser.link_arguments("data.patch_size", "model.patch_size")
        parser.link_arguments("data.slice_axis", "model.slice_axis")
        parser.link_arguments("model.net", "model.net_config", compute_fn=namespace_to_dict)
        parser.link_arguments("model.net", "data.network", apply_on="instantiate")

    def _parse_ckpt_path(self) -> None:
        """Resolve ``--ckpt_path last`` and refuse an unsafe or foreign file, then Lightning's.

        Lightning's own step reads the checkpoint's hyperparameters as config defaults; it is
        the first to open ``--ckpt_path``, so the file is checked here (read as tensors and
        plain data only, one line naming it when refused). Its network weights are kept until
        the model exists and can be compared with them (:meth:`instantiate_trainer`).
        """
        config = self.config.get(self.config.get("subcommand") or "", None)
        if config is not None and config.get("ckpt_path"):
            if config.ckpt_path == "last":
                config.ckpt_path = str(last_checkpoint_of_run(Path(config.runs_dir)
                                                              / config.name))
            checkpoint = read_checkpoint(config.ckpt_path)
            if LIGHTNING_VERSION_KEY not in checkpoint:
                raise CheckpointError(f"{config.ckpt_path}: holds a network for inference but "
                                      "no training state; `segmentation infer` reads it, "
                                      f"`{self.config.subcommand}` needs a checkpoint written "
                                      "by `segmentation fit`")
            self._checkpoint_weights = network_weights(checkpoint)
            record = (CheckpointRecord.from_checkpoint(checkpoint, config.ckpt_path)
                      if checkpoint.get(RECORD_KEY) else None)
            self._checkpoint_dims = (record.preprocessing.spatial_dims
                                     if record and record.preprocessing else None)
            del checkpoint
        super()._parse_ckpt_path()

    def before_instantiate_classes(self) -> None:
        """Channels from the dataset, ``--ckpt_path last``, determinism, a default root dir."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        if self.subcommand == "predict":
            if not config.ckpt_path:
                raise ValueError("predict needs --ckpt_path: a checkpoint written by fit (or "
                                 "`last` for the newest of --name); without one the network's "
                                 "random initial weights would segment")
            if config.return_predictions is None:  # written to disk, not kept in memory
                config.return_predictions = False
        channels_from_dataset(config)
        if "weights_only" in config and config.weights_only is None:
            # our checkpoints hold tensors and plain data: never unpickle anything else
            config.weights_only = True
        if config.deterministic:
            config.trainer.deterministic = True
        if config.trainer.default_root_dir is None:
            config.trainer.default_root_dir = str(Path(config.runs_dir) / config.name)

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """The trainer, with this project's defaults where the config leaves them open.

        Loggers (TensorBoard and CSV in one new ``runs_dir/name/version_N`` folder) are made
        here rather than written into the config, so a run's saved config.yaml can be reused
        as it is and still gets a fresh folder. Added callbacks: checkpoints (best by val/dice,
        and last), a rich progress bar (unless ``--trainer.enable_progress_bar false``) and,
        when there is a logger (not with ``--trainer.logger false``), learning-rate logging; a
        callback type the config already names is not added twice; peak GPU memory is logged
        with the learning rate.
        """
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.get("ckpt_path"):  # before any run folder exists
            check_weights_fit(config.ckpt_path, self._checkpoint_weights, self.model.net)
            del self._checkpoint_weights
        trainer = self._get(self.config_init, "trainer", default={})
        logger = trainer.get("logger")
        version = os.environ.get(RUN_VERSION_ENV) or next_version(Path(config.runs_dir)
                                                                  / config.name)
        os.environ[RUN_VERSION_ENV] = version
        if logger in (None, True):
            kwargs["logger"] = [
                TensorBoardLogger(config.runs_dir, name=config.name, version=version,
                                  default_hp_metric=False),
                CSVLogger(config.runs_dir, name=config.name, version=version),
            ]
        every = config.checkpoint_every_n_steps or None
        validates = config.data.fold != ALL_FOLD
        if not validates and self.subcommand in ("validate", "test"):
            raise ValueError(f"data.fold={ALL_FOLD!r} holds no case out of training, so there "
                             f"is nothing to {self.subcommand}; use a numbered fold")
        extra: list[Any] = []
        if self.subcommand == "fit":  # other subcommands write no checkpoints
            extra.append(LastCheckpoint(every_n_train_steps=every))
        if self.subcommand == "fit" and validates:  # fold "all" has no best epoch to pick
            extra.insert(0, ModelCheckpoint(monitor="val/dice", mode="max", save_top_k=1,
                                            filename="best-{epoch:03d}",
                                            auto_insert_metric_name=False))
        if self.subcommand == "predict":
            extra.append(self._prediction_writer(config, Path(config.runs_dir) / config.name
                                                 / version))
        if trainer.get("enable_progress_bar") is not False:  # Lightning refuses a bar when off
            extra.append(RichProgressBar())
        if logger is None or bool(logger):  # a LearningRateMonitor without a logger raises
            extra += [LearningRateMonitor(logging_interval="step"), PeakMemory()]
        configured = trainer.get("callbacks") or []
        configured = configured if isinstance(configured, list) else [configured]
        def kind(callback: Any) -> type:  # any progress bar replaces ours
            return AnyProgressBar if isinstance(callback, AnyProgressBar) else type(callback)

        kinds = {kind(c) for c in configured}
        kwargs["callbacks"] = configured + [c for c in extra if kind(c) not in kinds]
        return super().instantiate_trainer(**kwargs)

    def _prediction_writer(self, config: Namespace, run_dir: Path) -> PredictionWriter:
        """The writer of ``predict``, after checking everything it will write.

        The first process checks (and creates the output folder) before DDP starts the others,
        which would otherwise find the first one's fresh outputs and refuse them.
        """
        settings = config.prediction
        output_dir = Path(settings.output_dir or run_dir / PREDICTIONS_FOLDER)
        cases = self.datamodule.predict_cases()
        if rank_zero_only.rank == 0:
            check_prediction_outputs(cases, output_dir,
                                     save_probabilities=settings.save_probabilities,
                                     overwrite=settings.overwrite,
                                     spatial_dims=self._checkpoint_dims)
        model = config.model
        record = {"overlap": model.overlap, "tta": model.mirror_tta,
                  "batch_size": model.sw_batch_size, "precision": str(config.trainer.precision),
                  "save_probabilities": settings.save_probabilities,
                  "overwrite": settings.overwrite}
        return PredictionWriter(output_dir, cases, config.ckpt_path, settings=record,
                                save_probabilities=settings.save_probabilities)


def run_lightning(args: Sequence[str] | None) -> int:
    """Run a LightningCLI subcommand (``args`` None: the command line); returns the exit code.

    Lightning ends an interrupted run itself, after saving what it can: Ctrl-C with
    ``sys.exit(1)``, SIGTERM with SIGTERMException (exit 0). Both are reported as one line
    with the conventional codes, 130 and 143, so a script or scheduler can tell them apart
    from a finished run.
    """
    try:
        SegmentationCLI(args=None if args is None else list(args))
    except SIGTERMException:
        print("terminated", file=sys.stderr)
        return 143
    except SystemExit as exit_:
        if isinstance(exit_.__context__, KeyboardInterrupt):
            print("interrupted", file=sys.stderr)
            return 130
        raise
    return 0
