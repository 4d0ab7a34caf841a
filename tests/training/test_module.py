"""The Lightning module: learning, checkpoints that rebuild it, dataset checks, compilation."""

from __future__ import annotations

import copy

import nibabel as nib
import pytest
import pytorch_lightning as pl
import torch

from segmentation import UNet
from segmentation.data.datamodule import SegmentationDataModule
from segmentation.inference.checkpoint import load_trained_network
from segmentation.training.module import SegmentationModule


def test_a_network_not_matching_the_dataset_is_refused(tiny3d):
    """The safety net for networks whose channel arguments have other names."""
    dm = SegmentationDataModule(str(tiny3d), patch_size=(16, 16, 16), n_folds=2, num_workers=0)
    dm.setup("fit")
    module = SegmentationModule(UNet(spatial_dims=3, out_channels=3, features=(4, 8)),
                                patch_size=(16, 16, 16))
    with pytest.raises(ValueError, match="set model.net.init_args.out_channels: 4"):
        module._check_matches_dataset(dm)


def test_short_fit_improves_dice_and_checkpoint_rebuilds_identical_module(tiny3d, tmp_path):
    torch.manual_seed(0)
    net = UNet(spatial_dims=3, out_channels=4, features=(8, 16, 32), deep_supervision=True)
    dm = SegmentationDataModule(str(tiny3d), n_folds=2, patch_size=(24, 24, 16), batch_size=2,
                                patches_per_epoch=16, num_workers=0, cache="memory",
                                augment=False, network=net)
    module = SegmentationModule(net, patch_size=(24, 24, 16),
                                optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    trainer = pl.Trainer(max_epochs=6, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0,
                         check_val_every_n_epoch=100)
    before = trainer.validate(module, datamodule=dm, verbose=False)[0]["val/dice"]
    trainer.fit(module, datamodule=dm)
    after = trainer.validate(module, datamodule=dm, verbose=False)[0]["val/dice"]
    assert after > before + 0.2, (before, after)
    predictions = trainer.predict(module, datamodule=dm)  # the dataset's imagesTs
    assert len(predictions) == 1 and [p["case_id"] for p in predictions[0]] == ["synth_004"]
    probabilities = predictions[0][0]["probabilities"]  # on the scan's own grid
    scan = nib.load(tiny3d / "imagesTs" / "synth_004_0000.nii.gz")
    assert probabilities.shape == (4, *scan.shape)
    torch.testing.assert_close(probabilities.sum(0), torch.ones(scan.shape))
    assert probabilities.argmax(0).max() > 0

    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # plain data only
    state = checkpoint["state_dict"]
    assert state and all(key.startswith("net.") for key in state)  # the network, once
    meta = checkpoint["segmentation"]
    assert meta["output_patch_size"] == list(dm.output_size)
    rebuilt = SegmentationModule.load_from_checkpoint(path, net=copy.deepcopy(module.net))
    resaved: dict = {}
    rebuilt.on_save_checkpoint(resaved)  # what saving the loaded module again writes
    assert resaved["segmentation"] == meta
    assert rebuilt.preprocessing == dm.preprocessing
    assert rebuilt.label_names == {0: "background", 1: "organ", 2: "vessel", 3: "lesion"}
    assert list(rebuilt.hparams.patch_size) == [24, 24, 16]
    net, record = load_trained_network(path)  # what infer rebuilds: no Lightning involved
    assert record.preprocessing == dm.preprocessing and record.patch_size == (24, 24, 16)
    x = torch.randn(1, 1, 24, 24, 16)
    with torch.no_grad():
        assert torch.equal(net(x), module.eval().net(x))


def test_compiled_network_matches_eager_and_keeps_the_state_dict_plain():
    torch.manual_seed(0)
    net = UNet(spatial_dims=3, features=(4, 8), out_channels=3)
    module = SegmentationModule(net, patch_size=(16, 16, 16), compile=True)
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.allclose(module(x), net(x), atol=1e-5)
    assert all(key.startswith("net.") for key in module.state_dict())


@pytest.mark.parametrize("dims", [2, 3])
def test_channels_last_changes_the_memory_layout_not_the_logits(dims):
    torch.manual_seed(0)
    net = UNet(spatial_dims=dims, out_channels=3, features=(4, 8))
    reference = copy.deepcopy(net).eval()
    module = SegmentationModule(net, patch_size=(16,) * dims, channels_last=True)
    module.setup("fit")
    layout = torch.channels_last_3d if dims == 3 else torch.channels_last
    convs = [m.weight for m in net.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Conv3d)
             and m.kernel_size != (1,) * dims]
    assert convs and all(w.is_contiguous(memory_format=layout) for w in convs)
    x = torch.randn(2, 1, *(16,) * dims)
    with torch.no_grad():
        torch.testing.assert_close(module.eval()(x), reference(x), atol=1e-5, rtol=1e-5)


def test_the_epoch_mean_loss_weighs_each_batch_by_its_samples():
    """Batches of 3 and 1 patches: the mean over the 4 patches, not over the 2 batches."""
    torch.manual_seed(0)
    net = UNet(spatial_dims=3, features=(4, 8), out_channels=4)
    module = SegmentationModule(net, patch_size=(8, 8, 8))
    losses, means = [], []
    watch = pl.Callback()
    watch.on_train_batch_end = lambda trainer, pl_module, outputs, *args: (
        losses.append(float(outputs["loss"])), means.append(
            (float(pl_module.train_loss_mean.weight),
             float(pl_module.train_loss_mean.mean_value))))
    patches = [{"image": torch.randn(1, 8, 8, 8), "label": torch.randint(0, 4, (1, 8, 8, 8))}
               for _ in range(4)]
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, callbacks=[watch],
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, torch.utils.data.DataLoader(patches, batch_size=3))
    assert len(losses) == 2
    assert means[-1][0] == 4
    assert means[-1][1] == pytest.approx(3 * losses[0] + losses[1], rel=1e-5)
