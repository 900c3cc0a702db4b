import json

import numpy as np
import pytest
from PIL import Image

from convnext_deploy.calibration.fashion_mnist import FashionMNIST
from convnext_deploy.calibration.imagefolder import ImageFolder
from convnext_deploy.calibration.split import make_split
from convnext_deploy.pipeline.core.errors import UserError


def test_fashion_mnist_split_is_disjoint_balanced_and_reproducible(fmnist_root):
    train, test = FashionMNIST("train"), FashionMNIST("test")
    split = make_split(train, test, n_calib=500, n_eval=None, seed=0)
    assert split.calibration.source == "fashion-mnist/train" and split.evaluation.source == "fashion-mnist/test"
    assert len(split.calibration) == 500 and len(split.evaluation) == 10_000
    assert np.bincount(train.labels[split.calibration.indices]).tolist() == [50] * 10
    again = make_split(train, test, n_calib=500, n_eval=None, seed=0)
    assert again.calibration.ids_sha256 == split.calibration.ids_sha256
    other = make_split(train, test, n_calib=500, n_eval=None, seed=1)
    assert other.calibration.ids_sha256 != split.calibration.ids_sha256
    manifest = json.loads(split.manifest_json())
    assert manifest["calibration"]["indices"] == split.calibration.indices and not manifest["shared_source"]


def test_one_source_for_both_is_carved_disjointly(fmnist_root):
    test = FashionMNIST("test")
    split = make_split(test, test, n_calib=300, n_eval=2000, seed=0)
    assert split.shared_source
    assert not set(split.calibration.indices) & set(split.evaluation.indices)
    assert len(split.evaluation) == 2000


def _png(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(path)


def test_the_same_file_on_both_sides_is_refused(tmp_path):
    """A training tree that links to validation images is caught by resolved path."""
    for i in range(3):
        _png(tmp_path / "val" / "a" / f"{i}.png")
    (tmp_path / "train" / "a").mkdir(parents=True)
    for i in range(3):
        (tmp_path / "train" / "a" / f"{i}.png").symlink_to(tmp_path / "val" / "a" / f"{i}.png")
    with pytest.raises(UserError, match="in both the calibration and the evaluation set"):
        make_split(ImageFolder(tmp_path / "train"), ImageFolder(tmp_path / "val"), n_calib=3, n_eval=None)


def test_empty_calibration_set_is_refused(fmnist_root):
    test = FashionMNIST("test")
    with pytest.raises(UserError, match="calibration set is empty"):
        make_split(FashionMNIST("train"), test, n_calib=0, n_eval=10)
    with pytest.raises(UserError, match="more than"):
        make_split(test, test, n_calib=10_000, n_eval=10)


def test_more_control_images_are_bounded_by_memory_and_by_the_reference_speed():
    """At a gate's boundary: three times the control split, at least 2,000, within 512 MiB of float images and
    150 s of the reference's and a candidate's passes at the reference's measured speed."""
    from convnext_deploy.calibration.split import more_control_count

    at_224, at_32 = 3 * 224 * 224 * 4, 3 * 32 * 32 * 4
    assert more_control_count(120, at_224, 0.0) == (512 << 20) // at_224 - 120 == 771  # memory binds
    assert more_control_count(120, at_224, 0.41) == 182  # ConvNeXt-L's reference pace on a Zen 4: time binds
    assert more_control_count(120, at_32, 0.001) == 2000  # atto at 32 px: neither
    assert more_control_count(1000, at_32, 0.001) == 3000
    assert more_control_count(120, at_224, 100.0) == 0  # slower than the budget allows a single image
