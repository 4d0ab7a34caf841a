"""What the data module keeps under cache_dir (volumes, passed checks, fitted preprocessing) is
read again only while the files it came from are unchanged."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from segmentation.data.datamodule import SegmentationDataModule


def test_disk_cache_reads_a_rewritten_image_again(synth_copy, tmp_path):
    dm = SegmentationDataModule(str(synth_copy), patch_size=(16, 16, 16), cache="disk",
                                cache_dir=str(tmp_path / "cache"), spacing=None,
                                normalization="none", num_workers=0, check=False)
    dm.setup("fit")
    case = dm.train_cases[0]
    before = dm.volumes([case])[0]["image"]
    image = nib.load(str(case.images[0]))
    rewritten = np.asanyarray(image.dataobj).astype(np.float32) * 2 + 5
    nib.save(nib.Nifti1Image(rewritten, image.affine, image.header), str(case.images[0]))
    after = dm.volumes([case])[0]["image"]  # a new dataset over the same cache folder
    assert torch.allclose(torch.as_tensor(after), torch.as_tensor(before) * 2 + 5, atol=1e-4)
    assert dm.volumes([case])[0]["image"].equal(after)  # and the new entry is reused


def test_a_passed_check_and_the_fitted_preprocessing_are_reused_until_a_file_changes(
        synth_copy, tmp_path, monkeypatch):
    from segmentation.data import datamodule, fitted_preprocessing

    checks, fits = [], []
    real_check, real_fit = datamodule.check_dataset, fitted_preprocessing.fit_preprocessing
    monkeypatch.setattr(datamodule, "check_dataset",
                        lambda root: checks.append(root) or real_check(root))
    monkeypatch.setattr(fitted_preprocessing, "fit_preprocessing",
                        lambda cases, **kw: fits.append(kw) or real_fit(cases, **kw))

    def start(**settings) -> SegmentationDataModule:
        dm = SegmentationDataModule(str(synth_copy), patch_size=(16, 16, 16), num_workers=0,
                                    cache="none", cache_dir=str(tmp_path / "cache"), **settings)
        dm.prepare_data()
        dm.setup("fit")
        return dm

    first = start(normalization="ct")
    second = start(normalization="ct")  # another process, or the next run
    assert len(checks) == 1 and len(fits) == 1
    assert second.preprocessing.as_dict() == first.preprocessing.as_dict()
    start(normalization="zscore")  # other settings: fitted again, the check still holds
    assert len(checks) == 1 and len(fits) == 2

    image = nib.load(str(first.train_cases[0].images[0]))
    changed = np.asanyarray(image.dataobj).astype(np.float32) + 100
    nib.save(nib.Nifti1Image(changed, image.affine, image.header),
             str(first.train_cases[0].images[0]))
    third = start(normalization="ct")  # a rewritten scan: checked and fitted again
    assert len(checks) == 2 and len(fits) == 3
    assert third.preprocessing.channel_stats != first.preprocessing.channel_stats
    first.train_cases[1].label.unlink()  # a missing file: the check names it, no traceback
    with pytest.raises(ValueError, match="failed its integrity check"):
        start(normalization="ct")
