"""ImageFolder trees as they really arrive (issue 24, item 5): junk that operating systems drop is skipped unread,
every image Pillow reads (any colour mode, an extension that lies) gives the pixels the bundle's predict.py gives,
and a broken image stops the deploy in one line naming it."""
import io
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image
from test_deploy import _cli_here, _one_clear_line

from convnext_deploy.calibration.fashion_mnist import FashionMNIST
from convnext_deploy.calibration.imagefolder import ImageFolder, read_image
from convnext_deploy.calibration.preprocess import pixels, preprocess
from convnext_deploy.pipeline.core.errors import UserError
from convnext_deploy.pipeline.models.variants import get_variant

from bundle_helpers import load_module
from conftest import PINNED_RECIPE, REPO

PREDICT = REPO / "pipeline" / "ship" / "bundle_files" / "predict.py"
JUNK = {".DS_Store": b"\x00\x00\x00\x01Bud1" + b"\x00" * 64, "Thumbs.db": b"\xd0\xcf\x11\xe0" + b"\x00" * 60,
        "desktop.ini": b"[.ShellClassInfo]\r\n", "notes.txt": b"shot on the 3rd\n",
        ".hidden.png": b"\x89PNG\r\n\x1a\n broken"}  # hidden: skipped even with an image suffix


def _apple_double(name: str) -> bytes:
    """What macOS writes as `._<name>` on a foreign disk: an AppleDouble header, no image."""
    return b"\x00\x05\x16\x07\x00\x02\x00\x00" + b"Mac OS X        " + b"\x00\x02" + name.encode() + b"\x00" * 32


def _colourful(grey: Image.Image, size=(40, 33)) -> Image.Image:
    g = np.asarray(grey.resize(size, Image.Resampling.BILINEAR))
    return Image.fromarray(np.stack([g, g // 2 + 40, 255 - g], axis=-1).astype(np.uint8))


def _messy_class(folder, images: list[Image.Image]) -> dict[str, Image.Image | None]:
    """Real pictures saved in every mode and disguise; returns {file name: the L source when the file is that grey
    image exactly (its pixels must match), else None}."""
    folder.mkdir(parents=True)
    grey, other = images[0], images[1:]
    rgb = _colourful(other[0])
    files = {}

    def save(name, img, exact=None, **kw):
        img.save(folder / name, **kw)
        files[name] = exact

    save("grey_L.png", grey, exact=grey)
    la = grey.convert("LA")
    la.putalpha(100)
    save("grey_LA.png", la, exact=grey)  # alpha dropped, not composited
    rgba = rgb.convert("RGBA")
    rgba.putalpha(128)
    save("rgba.png", rgba)
    save("palette_P.png", rgb.convert("P", palette=Image.Palette.ADAPTIVE))
    save("photo_cmyk.jpg", rgb.convert("CMYK"), quality=92)
    save("photo_rgb.jpeg", rgb, quality=92)
    wide = (np.asarray(grey).astype(np.uint16) * 257)  # 16-bit grey whose top byte is the 8-bit picture
    save("grey16_I16.png", Image.fromarray(wide), exact=grey)
    save("png_named.jpg", _colourful(other[1], (31, 52)), format="PNG")  # the extension lies
    save("jpeg_named.png", _colourful(other[2], (28, 28)), format="JPEG", quality=90)
    save("tiff16.tif", Image.fromarray(wide), exact=grey)
    save("bilevel.bmp", other[3].convert("1"))
    save("anim.gif", other[4].convert("P"))
    save("photo.webp", rgb)
    for name in [n for n in files if not n.startswith(".")]:
        (folder / f"._{name}").write_bytes(_apple_double(name))
    for name, data in JUNK.items():
        (folder / name).write_bytes(data)
    return files


@pytest.fixture(scope="module")
def fmnist_test():
    return FashionMNIST("test")


def _pictures(data, label: int, n: int, skip: int = 0) -> list[Image.Image]:
    return [data[int(i)][0] for i in np.flatnonzero(data.labels == label)[skip:skip + n]]


def test_junk_is_skipped_and_every_readable_image_counts_with_the_bundles_pixels(fmnist_test, tmp_path):
    root = tmp_path / "val"
    expected = {}
    for c in ("boot", "shirt"):
        files = _messy_class(root / c, _pictures(fmnist_test, 9 if c == "boot" else 6, 6))
        expected.update({root / c / n: exact for n, exact in files.items()})
    (root / "__MACOSX" / "boot").mkdir(parents=True)  # a macOS zip's companions: not a class
    (root / "__MACOSX" / "boot" / "._grey_L.png").write_bytes(_apple_double("grey_L.png"))
    (root / ".Trashes").mkdir()
    (root / "Thumbs.db").write_bytes(JUNK["Thumbs.db"])
    src = ImageFolder(root)
    assert src.class_names == ("boot", "shirt")
    assert len(src) == len(expected) == 26 and {p for p, _ in src.samples} == set(expected)
    predict = load_module(PREDICT)  # the bundle's device-side reader and preprocessing
    atto = get_variant("atto").preprocessing
    for pp in (atto, replace(atto, input_size=32, crop_pct=1.0, interpolation="bilinear")):
        pp_json = pp.to_dict()
        for i, (path, label) in enumerate(src.samples):
            img, y = src[i]
            assert y == label
            ours = preprocess(img, pp)
            theirs = predict.to_input(predict._open(str(path)), pp_json)  # the pixels an image-input model takes
            np.testing.assert_array_equal(pixels(img, pp), theirs, err_msg=path.name)
            if expected[path] is not None:  # the L picture it was made from, to the pixel
                np.testing.assert_array_equal(ours, preprocess(expected[path], pp), err_msg=path.name)
            assert np.ptp(ours) > 1, path.name  # a picture, not a white (clipped) or black field


def test_sixteen_bit_grey_is_scaled_not_clipped(fmnist_test, tmp_path):
    grey = fmnist_test[0][0]
    Image.fromarray(np.asarray(grey).astype(np.uint16) * 257).save(tmp_path / "g16.png")
    img = read_image(tmp_path / "g16.png")
    assert img.mode.startswith("I")
    assert set(np.unique(img.convert("RGB")).tolist()) == {0, 255}  # Pillow's convert clips: only black and white
    assert len(np.unique(grey)) > 100
    pp = get_variant("atto").preprocessing
    np.testing.assert_array_equal(preprocess(img, pp), preprocess(grey, pp))
    as_i = Image.fromarray(np.asarray(grey).astype(np.int32) * 257)  # mode I: older Pillow's 16-bit PNG
    assert as_i.mode == "I"
    np.testing.assert_array_equal(preprocess(as_i, pp), preprocess(grey, pp))


def _truncated_jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").resize((64, 64)).save(buf, format="JPEG", quality=95)
    data = buf.getvalue()
    return data[: len(data) // 2]


def test_a_broken_image_is_named_in_one_line(fmnist_test, tmp_path):
    (tmp_path / "a").mkdir()
    fmnist_test[0][0].save(tmp_path / "a" / "ok.png")
    broken = tmp_path / "a" / "half.jpg"
    broken.write_bytes(_truncated_jpeg(fmnist_test[1][0]))
    src = ImageFolder(tmp_path)  # listed: a truncated file is found when it is read
    assert len(src) == 2
    with pytest.raises(UserError) as e:
        [src[i] for i in range(len(src))]
    assert str(broken) in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "a" / "empty.jpg").write_bytes(b"")
    with pytest.raises(UserError, match="empty image file .*empty.jpg") as e:
        ImageFolder(tmp_path)  # an empty file is refused as soon as the tree is listed
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="empty.jpg"):
        read_image(tmp_path / "a" / "empty.jpg")


def _tree(data, root, per_class: int, skip: int = 0):
    for c in range(10):
        (root / str(c)).mkdir(parents=True)
        for k, img in enumerate(_pictures(data, c, per_class, skip)):
            img.save(root / str(c) / f"{k}.png")


# truncated_in_eval is found only when evaluation decodes it, after the builds (~40 s): in `make test-all`
@pytest.mark.parametrize("case", ["truncated_in_calib", "empty_in_eval",
                                  pytest.param("truncated_in_eval", marks=pytest.mark.slow)])
def test_deploy_refuses_a_broken_image_naming_it(case, atto_reference, cli_env, fmnist_test, tmp_path,
                                                 monkeypatch, capsys):
    """A calibration image is read in prepare and an empty file is refused when the tree is listed: both before any
    build. A truncated evaluation image is decoded (and named the same way) when the evaluation reaches it, after
    the builds; the report directory is published atomically at the end, so nothing of it is written."""
    calib, val = tmp_path / "train", tmp_path / "val"
    _tree(fmnist_test, calib, 5)
    _tree(fmnist_test, val, 5, skip=5)
    if case == "truncated_in_calib":
        broken = calib / "3" / "zz_half.jpg"
        broken.write_bytes(_truncated_jpeg(fmnist_test[0][0]))
        n_calib = 51  # every calibration image, the broken one among them
        extra = []
    elif case == "empty_in_eval":
        broken = val / "7" / "empty.jpg"
        broken.write_bytes(b"")
        n_calib = 50
        extra = []
    else:  # gates on speed alone: no control split is held out, so the evaluation reads it after the builds
        broken = val / "7" / "zz_half.jpg"
        broken.write_bytes(_truncated_jpeg(fmnist_test[0][0]))
        n_calib = 50
        gates = tmp_path / "speed_only.toml"
        gates.write_text("[defaults]\nmax_p50_ms = 100000\n")
        extra = ["--gates", str(gates), "--runs", "3"]
    (calib / "3" / "._zz_half.jpg").write_bytes(_apple_double("zz_half.jpg"))  # skipped, not refused
    out = tmp_path / "out"
    p = _cli_here(["deploy", "--target", "onnxruntime", "--variant", "atto", "--calib-data", str(calib),
                   "--eval-data", str(val), "--calib", str(n_calib), *PINNED_RECIPE, "--out", str(out), *extra],
                  cli_env, monkeypatch, capsys)
    assert p.returncode == 2, p.stdout + p.stderr
    line = _one_clear_line(p)
    assert str(broken) in line, line
    assert not out.exists()
    assert ("stage export" in p.stdout) == (case == "truncated_in_eval"), p.stdout  # the others stop in prepare


@pytest.mark.slow  # a whole deploy (~1 min); the counting itself is checked above without one
def test_deploy_on_a_messy_tree_counts_every_readable_image(atto_reference, cli_env, fmnist_test, tmp_path,
                                                            monkeypatch, capsys):
    """The same tree through the CLI: no traceback, the junk unread, every readable image in the figures."""
    import json

    calib, val = tmp_path / "train", tmp_path / "val"
    _tree(fmnist_test, calib, 5)
    n = sum(len(_messy_class(val / str(c), _pictures(fmnist_test, c, 6, skip=5))) for c in range(10))
    (val / "__MACOSX").mkdir()
    (val / ".DS_Store").write_bytes(JUNK[".DS_Store"])
    gates = tmp_path / "speed_only.toml"
    gates.write_text("[defaults]\nmax_p50_ms = 100000\n")
    out = tmp_path / "out"
    p = _cli_here(["deploy", "--target", "onnxruntime", "--variant", "atto", "--calib-data", str(calib),
                   "--eval-data", str(val), "--calib", "50", "--runs", "3", *PINNED_RECIPE, "--gates", str(gates),
                   "--out", str(out)], cli_env, monkeypatch, capsys)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stdout + p.stderr
    r = json.loads((out / "report.json").read_text())
    assert r["data"]["evaluation"]["n"] + (r["data"].get("control") or {}).get("n", 0) == n == 130
    assert "sorted folders" in r["data"]["task"]
