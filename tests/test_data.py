import gzip

import numpy as np
import pytest
from PIL import Image

from convnext_deploy.calibration.batches import iter_batches
from convnext_deploy.calibration.fashion_mnist import CLASS_NAMES, FashionMNIST, read_idx
from convnext_deploy.calibration.imagefolder import ImageFolder
from convnext_deploy.calibration.preprocess import preprocess
from convnext_deploy.pipeline.core.errors import UserError
from convnext_deploy.pipeline.models.variants import Preprocessing, get_variant


def test_fashion_mnist_sizes_and_label_histograms(fmnist_root):
    train, test = FashionMNIST("train"), FashionMNIST("test")
    assert (len(train), len(test)) == (60_000, 10_000)
    assert train.images.shape == (60_000, 28, 28) and train.images.dtype == np.uint8
    assert np.bincount(train.labels).tolist() == [6000] * 10
    assert np.bincount(test.labels).tolist() == [1000] * 10
    # the first test image is an ankle boot, the second a pullover (the dataset's published order)
    assert [CLASS_NAMES[test[i][1]] for i in range(2)] == ["Ankle boot", "Pullover"]
    img, _ = test[0]
    assert img.size == (28, 28) and img.mode == "L"


def _write_idx(path, payload: bytes):
    with gzip.open(path, "wb") as f:
        f.write(payload)


@pytest.mark.parametrize("case,match", [
    ("bad_magic", "bad magic"),
    ("truncated_data", "truncated or corrupt"),
    ("not_gzip", "unreadable IDX"),
    ("missing", "not found.*apt-get install dataset-fashion-mnist"),
])
def test_unreadable_idx_gives_one_clear_line(tmp_path, case, match):
    path = tmp_path / "x-idx3-ubyte.gz"
    header = bytes([0, 0, 8, 3]) + (2).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    if case == "bad_magic":
        _write_idx(path, b"\x12\x34\x56\x78" + b"\0" * 100)
    elif case == "truncated_data":
        _write_idx(path, header + b"\0" * (2 * 28 * 28 - 5))
    elif case == "not_gzip":
        path.write_bytes(b"this is not gzip")
    before = sorted(tmp_path.iterdir())
    with pytest.raises(UserError, match=match) as e:
        read_idx(path)
    assert "\n" not in str(e.value)
    assert sorted(tmp_path.iterdir()) == before  # nothing written


def test_idx_reader_parses_a_written_file(tmp_path):
    data = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "ok-idx3-ubyte.gz"
    _write_idx(path, bytes([0, 0, 8, 3]) + b"".join(int(d).to_bytes(4, "big") for d in data.shape) + data.tobytes())
    assert np.array_equal(read_idx(path), data)


def test_preprocess_grey_to_three_channels_resize_crop_normalise():
    pp = Preprocessing(input_size=32, crop_pct=1.0, interpolation="bicubic", mean=(0.5,) * 3, std=(0.25,) * 3)
    grey = Image.fromarray(np.full((28, 28), 255, np.uint8), mode="L")
    x = preprocess(grey, pp)
    assert x.shape == (3, 32, 32) and x.dtype == np.float32
    assert np.allclose(x, (1.0 - 0.5) / 0.25, atol=1e-3)


def test_preprocess_imagenet_convention_resize_then_centre_crop():
    pp = get_variant("t").preprocessing  # 224, crop 0.875, bicubic
    img = np.zeros((300, 400, 3), np.uint8)
    img[:, 200:] = 255  # right half white
    x = preprocess(Image.fromarray(img), pp)
    assert x.shape == (3, 224, 224)
    # short side → 256, long side → 341; crop starts at 58: the white edge sits at 256 - 58 = 198 columns
    row = x[0, 112]
    white = (1 - pp.mean[0]) / pp.std[0]
    assert np.isclose(row[-1], white, atol=1e-3) and row[0] < 0 and np.isclose(row[199], white, atol=0.05)
    assert preprocess(Image.fromarray(img), pp, input_size=160).shape == (3, 160, 160)


def _tree(root, classes=("cat", "dog"), per_class=3, size=(40, 30)):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_imagefolder_reads_classes_and_streams(tmp_path):
    src = ImageFolder(_tree(tmp_path / "val"))
    assert len(src) == 6 and src.class_names == ("cat", "dog")
    assert [lbl for _, lbl in src.samples] == [0, 0, 0, 1, 1, 1]
    pp = Preprocessing(input_size=24, crop_pct=0.875)
    batches = list(iter_batches(src, range(len(src)), pp, batch_size=4))
    assert [b[0].shape for b in batches] == [(4, 3, 24, 24), (2, 3, 24, 24)]
    assert batches[1][1].tolist() == [1, 1]


def test_imagefolder_labels_by_class_names_or_sorted_folders(tmp_path):
    root = _tree(tmp_path / "t", classes=("dog", "cat"))
    by_name = ImageFolder(root, class_names=["dog", "cat"])
    assert by_name.label_rule == "names" and by_name.class_names == ("dog", "cat")
    assert sorted({lbl for p, lbl in by_name.samples if p.parent.name == "cat"}) == [1]
    wnids = ImageFolder(root, class_names=["a dog", "a cat"])  # folder names are not class names: sorted order
    assert wnids.label_rule == "sorted folders"
    with pytest.raises(UserError, match="2 class folders, but the checkpoint has 3 classes"):
        ImageFolder(root, class_names=["x", "y", "z"])


def test_batches_are_read_lazily():
    """Bounded memory: the iterator opens only the images of the batch it is about to yield."""
    opened = []

    class Counting:
        name, class_names = "counting", ("a",)

        def __len__(self):
            return 50_000

        def __getitem__(self, i):
            opened.append(i)
            return Image.new("L", (8, 8)), 0

        def sample_id(self, i):
            return str(i)

    it = iter_batches(Counting(), range(50_000), Preprocessing(input_size=8, crop_pct=1.0), batch_size=16)
    x, _ = next(it)
    assert x.shape[0] == 16 and len(opened) == 16


@pytest.mark.parametrize("case,match", [
    ("corrupt", "corrupt or unreadable image"),
    ("empty", "holds no class folders"),
    ("empty_class", "holds no images"),
    ("missing", "image folder not found"),
])
def test_imagefolder_bad_input(tmp_path, case, match):
    root = tmp_path / "data"
    if case == "corrupt":
        _tree(root)
        (root / "cat" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
        with pytest.raises(UserError, match=match) as e:
            src = ImageFolder(root)
            list(iter_batches(src, range(len(src)), Preprocessing(input_size=16)))
    else:
        if case == "empty":
            root.mkdir()
        elif case == "empty_class":
            _tree(root)
            (root / "zebra").mkdir()
        with pytest.raises(UserError, match=match) as e:
            ImageFolder(root)
    assert "\n" not in str(e.value)
