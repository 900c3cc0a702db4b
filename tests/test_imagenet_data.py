"""ImageNet-1k class names and data the way teams hold it (issue 16, item 4): the 1k list, names for published
heads, wnid-folder subsets, and unlabelled calibration images (a flat folder or a file list)."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from convnext_deploy.calibration.batches import iter_batches, load_array
from convnext_deploy.calibration.fashion_mnist import FashionMNIST
from convnext_deploy.calibration.imagefolder import WNID_RULE, ImageFolder
from convnext_deploy.calibration.imagelist import UNLABELLED, ImageList, calibration_source
from convnext_deploy.calibration.imagenet import CLASSES_FILE, imagenet_1k
from convnext_deploy.calibration.split import make_split
from convnext_deploy.pipeline.core.errors import UserError
from convnext_deploy.pipeline.models.checkpoints import imagenet_1k_names, load_checkpoint, save_checkpoint
from convnext_deploy.pipeline.models.convnext import create_model
from convnext_deploy.pipeline.models.variants import get_variant
from convnext_deploy.pipeline.stages.context import DeployConfig
from convnext_deploy.pipeline.stages.prepare import sources

from checkpoint_formats import hf_config, hf_state_dict, official_state_dict, timm_state_dict
from conftest import randomized

# ten ImageNet classes far apart in the index, one per Fashion-MNIST class: their sorted-folder positions
# (0..9) are not their 1k indices, so a tree read by folder order would label every image wrongly
SUBSET = (7, 150, 291, 388, 404, 531, 610, 779, 870, 999)


def test_the_class_list_is_imagenet_1k_in_index_order():
    c = imagenet_1k()
    assert len(c.wnids) == len(set(c.wnids)) == len(c.names) == 1000
    assert list(c.wnids) == sorted(c.wnids)  # the standard index order is the sorted wnids
    assert (c.wnids[0], c.names[0].split(",")[0]) == ("n01440764", "tench")
    assert (c.wnids[999], c.names[999].split(",")[0]) == ("n15075141", "toilet tissue")
    assert c.index["n02012849"] == 134 and c.index["n03126707"] == 517  # the two "crane"s keep their own index
    assert imagenet_1k_names() == c.names  # the checkpoint code reads the same file


def test_a_damaged_class_list_is_refused_in_one_line(tmp_path):
    from convnext_deploy.calibration.imagenet import read_class_list

    rows = CLASSES_FILE.read_text().splitlines()
    swapped = tmp_path / "swapped.tsv"
    swapped.write_text("\n".join([rows[0], rows[2], rows[1], *rows[3:]]) + "\n")
    with pytest.raises(UserError, match="unique and sorted"):
        read_class_list(swapped)
    broken = tmp_path / "broken.tsv"
    broken.write_text(rows[0] + "\n" + rows[1].replace("\t", " ") + "\n")
    with pytest.raises(UserError, match="line 2 is not 'wnid<TAB>name'"):
        read_class_list(broken)


def _save(img: Image.Image, path, fmt="PNG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt)
    return path


@pytest.fixture(scope="module")
def fmnist_test(fmnist_root):
    return FashionMNIST("test")


def _wnid_tree(root, data, per_class=12, fmt="PNG"):
    """Fashion-MNIST test images of class c in the folder of ImageNet class SUBSET[c]."""
    wnids = imagenet_1k().wnids
    for c, k in enumerate(SUBSET):
        for i in np.flatnonzero(data.labels == c)[:per_class]:
            _save(data[int(i)][0], root / wnids[k] / f"{i}.{fmt.lower()}", fmt)
    return root


def test_a_wnid_subset_tree_maps_to_the_1k_indices(tmp_path, fmnist_test):
    names = list(imagenet_1k().names)
    tree = ImageFolder(_wnid_tree(tmp_path / "val", fmnist_test, per_class=2, fmt="JPEG"), names)
    assert tree.label_rule == WNID_RULE and tree.class_names == tuple(names)
    wnids = imagenet_1k().wnids
    assert {p.parent.name: lbl for p, lbl in tree.samples} == {wnids[k]: k for k in SUBSET}
    # a head whose names are indices ("0".."999", a checkpoint that names none) maps the same way
    placeholders = ImageFolder(tmp_path / "val", [str(i) for i in range(1000)])
    assert [lbl for _, lbl in placeholders.samples] == [lbl for _, lbl in tree.samples]
    # not a 1k head: today's rule, one folder per class in sorted order
    assert ImageFolder(tmp_path / "val", list("abcdefghij")).label_rule == "sorted folders"


@pytest.fixture(scope="module")
def imagenet_head_checkpoint(atto_reference, tmp_path_factory):
    """The atto reference's ten classes placed at SUBSET's indices of a 1,000-class head (every other class
    far below), saved with ImageNet-1k's names: a real model whose 1k predictions are known."""
    ref = load_checkpoint(atto_reference, "atto")
    model = create_model("atto", num_classes=1000)
    sd = {k: v.clone() for k, v in ref.model.state_dict().items()}
    w = torch.zeros(1000, sd["head.fc.weight"].shape[1])
    b = torch.full((1000,), -1e4)
    w[list(SUBSET)], b[list(SUBSET)] = sd["head.fc.weight"], sd["head.fc.bias"]
    sd["head.fc.weight"], sd["head.fc.bias"] = w, b
    model.load_state_dict(sd)
    path = tmp_path_factory.mktemp("in1k") / "atto_in1k_subset.safetensors"
    save_checkpoint(model.eval(), path, variant=ref.variant, class_names=imagenet_1k().names,
                    preprocessing=ref.preprocessing)
    return ref, load_checkpoint(path, "atto")


def test_a_wnid_subset_evaluates_like_the_model_it_came_from(imagenet_head_checkpoint, fmnist_test, tmp_path):
    """100 images in 10 of the 1,000 class folders: every label lines up with the 1k head's output, so the
    1k model's top-1 on the tree equals the 10-class reference's on the same images."""
    ref, ck = imagenet_head_checkpoint
    tree = ImageFolder(_wnid_tree(tmp_path / "val", fmnist_test, per_class=10), list(ck.class_names))
    assert len(tree) == 100 and tree.label_rule == WNID_RULE
    preds, labels, ref_preds = [], [], []
    with torch.no_grad():
        for x, y in iter_batches(tree, range(len(tree)), ck.preprocessing, batch_size=50):
            preds.append(ck.model(torch.from_numpy(x)).argmax(1).numpy())
            ref_preds.append(np.asarray(SUBSET)[ref.model(torch.from_numpy(x)).argmax(1).numpy()])
            labels.append(y)
    preds, labels, ref_preds = map(np.concatenate, (preds, labels, ref_preds))
    assert np.array_equal(preds, ref_preds)
    truth = np.asarray(SUBSET)[[fmnist_test.labels[int(p.stem)] for p, _ in tree.samples]]
    assert np.array_equal(labels, truth)
    assert (preds == labels).mean() > 0.7  # the reference's own top-1 on Fashion-MNIST test is about 0.9


def test_unknown_wnid_folders_are_one_clear_line(tmp_path):
    root = tmp_path / "val"
    for wnid in ("n01440764", "n99999999"):
        _save(Image.new("RGB", (8, 8)), root / wnid / "a.png")
    with pytest.raises(UserError, match=r"1 class folder\(s\) are not ImageNet-1k wnids \(e.g. 'n99999999'\)") as e:
        ImageFolder(root, list(imagenet_1k().names))
    assert "\n" not in str(e.value) and "imagenet1k_classes.tsv" in str(e.value)


def test_calibration_from_a_flat_folder_and_from_a_file_list(tmp_path, fmnist_test):
    flat = tmp_path / "calib"
    for i in range(12):  # mixed formats and sizes, grey and colour, as a team's calibration folder is
        img = fmnist_test[i][0] if i % 2 else fmnist_test[i][0].convert("RGB").resize((40 + i, 30))
        _save(img, flat / f"img{i:02d}.{'jpg' if i % 3 else 'png'}", "JPEG" if i % 3 else "PNG")
    (flat / "notes.txt").write_text("not an image")
    src = calibration_source(flat)
    assert isinstance(src, ImageList) and len(src) == 12 and src[0][1] == UNLABELLED
    assert [p.name for p in src.paths][:3] == ["img00.png", "img01.jpg", "img02.jpg"]

    listing = tmp_path / "lists" / "calib.txt"
    listing.parent.mkdir()
    listing.write_text(f"# calibration images\n../calib/img04.jpg\n\n{flat / 'img00.png'}\n  ../calib/img07.jpg  \n")
    listed = calibration_source(listing)
    assert [p.name for p in listed.paths] == ["img04.jpg", "img00.png", "img07.jpg"]

    pp = get_variant("atto").preprocessing
    for s in (src, listed):
        x, y = load_array(s, range(len(s)), pp)
        assert x.shape == (len(s), 3, pp.input_size, pp.input_size) and np.isfinite(x).all()
        assert (y == UNLABELLED).all()


def test_unlabelled_calibration_never_overlaps_the_evaluation(imagenet_head_checkpoint, fmnist_test, tmp_path):
    """Through the deploy's own source choice: a flat calibration folder with a wnid evaluation tree splits
    disjointly; a file list that names evaluation images is refused."""
    _, ck = imagenet_head_checkpoint
    val = _wnid_tree(tmp_path / "val", fmnist_test, per_class=3)
    flat = tmp_path / "calib"
    for i in range(5000, 5020):
        _save(fmnist_test[i][0], flat / f"{i}.png")
    cfg = DeployConfig(target="onnxruntime", variant="atto", calib_data=flat, eval_data=val)
    calib, evals, task = sources(ck, cfg)
    assert isinstance(calib, ImageList) and WNID_RULE in task
    split = make_split(calib, evals, n_calib=10, n_eval=None, n_control=3, control_from="evaluation")
    assert len(split.calibration) == 10 and len(split.evaluation) == 27 and len(split.control) == 3
    ids = [{src.sample_id(i) for i in part.indices}
           for src, part in ((calib, split.calibration), (evals, split.evaluation), (evals, split.control))]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])

    leaky = tmp_path / "leaky.txt"
    leaky.write_text("\n".join(str(p) for p, _ in evals.samples))
    cfg = DeployConfig(target="onnxruntime", variant="atto", calib_data=leaky, eval_data=val)
    calib, evals, _ = sources(ck, cfg)
    with pytest.raises(UserError, match="in both the calibration and the evaluation set"):
        make_split(calib, evals, n_calib=len(calib), n_eval=None)


@pytest.mark.parametrize("case,match", [
    ("missing", "calibration data not found"),
    ("empty_folder", "holds no images"),
    ("empty_list", "lists no images"),
    ("missing_listed", "line 2: image not found"),
    ("binary_list", "not a text file of image paths"),
])
def test_bad_calibration_data_is_one_line(tmp_path, case, match):
    path = tmp_path / "calib"
    if case == "empty_folder":
        path.mkdir()
    elif case == "empty_list":
        path.write_text("# nothing yet\n\n")
    elif case == "missing_listed":
        _save(Image.new("L", (8, 8)), tmp_path / "a.png")
        path.write_text("a.png\nb.png\n")
    elif case == "binary_list":
        path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(UserError, match=match) as e:
        calibration_source(path)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- names for published heads


@pytest.fixture(scope="module")
def atto_1k():
    return randomized(create_model("atto", num_classes=1000))


def test_published_1k_heads_get_the_imagenet_names(atto_1k, tmp_path):
    names = imagenet_1k().names
    torch.save({"model": official_state_dict(atto_1k)}, tmp_path / "official.pth")
    torch.save(timm_state_dict(atto_1k, conv_mlp=True), tmp_path / "timm.pth")
    for f in ("official.pth", "timm.pth"):
        ck = load_checkpoint(tmp_path / f)
        assert ck.class_names == names and "ImageNet-1k" in ck.labels_note
    hf = tmp_path / "hf"
    hf.mkdir()
    torch.save(hf_state_dict(atto_1k), hf / "pytorch_model.bin")
    (hf / "config.json").write_text(json.dumps(hf_config(atto_1k, [f"LABEL_{i}" for i in range(1000)])))
    assert load_checkpoint(hf).class_names == names  # placeholders are no names
    real = [f"kind {i}" for i in range(1000)]
    (hf / "config.json").write_text(json.dumps(hf_config(atto_1k, real)))
    ck = load_checkpoint(hf)
    assert ck.class_names == tuple(real) and ck.labels_note == ""  # a Hugging Face id2label with names is kept


def test_a_22k_head_keeps_its_indices_with_a_note(tmp_path):
    from conftest import REPO, run_cli

    model = create_model("atto", num_classes=21841).eval()
    torch.save({"model": official_state_dict(model)}, tmp_path / "convnext_atto_22k_224.pth")
    ck = load_checkpoint(tmp_path / "convnext_atto_22k_224.pth")
    assert ck.num_classes == 21841 and ck.class_names == tuple(str(i) for i in range(21841))
    assert "ImageNet-22k head (21,841 classes)" in ck.labels_note and "indices" in ck.labels_note
    p = run_cli(["inspect", str(tmp_path / "convnext_atto_22k_224.pth")], {**os.environ, "PYTHONPATH": str(REPO)},
                code=0, timeout=120)
    info = json.loads(p.stdout)
    assert info["num_classes"] == 21841 and info["labels_note"] == ck.labels_note
    # a head of another size is not a published ImageNet head: indices, and no claim about them
    torch.save({"model": official_state_dict(create_model("atto", num_classes=37))}, tmp_path / "h37.pth")
    other = load_checkpoint(tmp_path / "h37.pth")
    assert other.class_names == tuple(str(i) for i in range(37)) and other.labels_note == ""
