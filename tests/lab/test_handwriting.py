"""The offline EMNIST stand-in: Debian handwriting fonts rendered, distorted and framed like MNIST."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mlflow_project.lab import handwriting as hw

N = 2000  # 32 per class on average: enough for the balance and framing checks, about 3 s to render


@pytest.fixture(scope="module")
def rendered():
    return hw.render_handwriting(N, seed=0)


def test_fonts_are_found_and_are_handwriting():
    fonts = hw.find_fonts()
    assert len(fonts) >= 3
    assert fonts == sorted(fonts)
    assert all(p.suffix.lower() in (".ttf", ".otf") for p in fonts)
    assert not any("dejavu" in str(p).lower() for p in fonts)
    table = hw.glyph_table(fonts)
    assert len({fg.name for fg in table}) >= 3
    assert set("".join(fg.chars for fg in table)) == set(hw.CHARSET), "every class needs at least one face"


def test_missing_fonts_name_the_packages(tmp_path):
    with pytest.raises(RuntimeError) as err:
        hw.find_fonts(tmp_path)
    message = str(err.value)
    assert "apt-get install --no-install-recommends " + " ".join(hw.HANDWRITING_FONT_PACKAGES) in message
    assert all(pkg in message for pkg in hw.HANDWRITING_FONT_PACKAGES)


def test_unusable_glyphs_are_left_out():
    table = hw.glyph_table()
    names = [fg.name for fg in table]
    assert len(names) == len(set(names)), "one entry per face (fonts-breip ships Breip twice)"
    for fg in table:
        assert set(fg.chars) <= set(hw.CHARSET)
        if fg.family.startswith("Because We"):  # unicase: draws capitals for a-z
            assert not any(c.islower() for c in fg.chars), fg.name
        if fg.family == "femkeklaver":  # outlined digits and capitals
            assert fg.chars == "abcdefghijklmnopqrstuvwxyz"
    lower_faces = [fg for fg in table if "a" in fg.chars]
    assert len({fg.family for fg in lower_faces}) >= 3


def test_glyphs_a_font_lacks_are_skipped(tmp_path):
    subset = pytest.importorskip("fontTools.subset")
    wanted = "0123ABCxyz"
    source = next(fg.path for fg in hw.glyph_table() if set(wanted) <= set(fg.chars))
    options = subset.Options()
    options.notdef_outline = True  # keep a visible .notdef box, as most fonts have
    font = subset.load_font(str(source), options)
    subsetter = subset.Subsetter(options)
    subsetter.populate(text=wanted)
    subsetter.subset(font)
    out = tmp_path / "partial.ttf"
    subset.save_font(font, str(out), options)
    (face,) = hw.glyph_table([out])
    assert face.chars == wanted


def test_charset_is_emnist_byclass():
    assert hw.CHARSET == "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    assert hw.NUM_CLASSES == 62


def test_shape_dtype_range(rendered):
    images, labels = rendered
    assert images.shape == (N, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (N,) and labels.dtype == np.int64
    assert labels.min() >= 0 and labels.max() < hw.NUM_CLASSES
    assert images.max() == 255 and images.min() == 0


def test_deterministic_and_seed_dependent(rendered):
    images, labels = rendered
    threads = torch.get_num_threads()
    again_x, again_y = hw.render_handwriting(300, seed=0)  # also the first 300 of the 2,000 (a partial batch)
    assert torch.get_num_threads() == threads, "the renderer must restore the torch thread count"
    assert again_x.tobytes() == images[:300].tobytes()
    assert np.array_equal(again_y, labels[:300])
    other_x, other_y = hw.render_handwriting(300, seed=1)
    assert other_x.tobytes() != again_x.tobytes()
    assert not np.array_equal(other_y, again_y)


def test_several_fonts_are_used():
    faces = hw.sample_faces(N, seed=0)
    assert len(faces) == N
    counts = {name: faces.count(name) for name in set(faces)}
    assert len(counts) >= 3
    assert max(counts.values()) < 0.3 * N, counts


def test_class_balance_is_roughly_uniform(rendered):
    _, labels = rendered
    counts = np.bincount(labels, minlength=hw.NUM_CLASSES)
    expected = N / hw.NUM_CLASSES
    assert counts.min() > 0
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected)), counts
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 120, chi2  # 61 degrees of freedom: p < 1e-5 above this


def test_mass_is_centred_and_box_is_mnist_sized(rendered):
    images, _ = rendered
    x = images.astype(np.float64)
    mass = x.sum((1, 2))
    idx = np.arange(28)
    cy = (x.sum(2) * idx).sum(1) / mass
    cx = (x.sum(1) * idx).sum(1) / mass
    centre = 13.5
    assert np.all(np.abs(cy - centre) <= 2) and np.all(np.abs(cx - centre) <= 2)
    assert abs(cy.mean() - centre) < 0.5 and abs(cx.mean() - centre) < 0.5
    ink = images > 63
    rows, cols = ink.any(2), ink.any(1)
    height = 28 - rows.argmax(1) - rows[:, ::-1].argmax(1)
    width = 28 - cols.argmax(1) - cols[:, ::-1].argmax(1)
    longest = np.maximum(height, width)
    assert np.median(longest) in (19, 20, 21, 22)
    assert longest.min() >= 16 and longest.max() <= 24


def test_images_are_neither_blank_nor_saturated(rendered):
    images, _ = rendered
    flat = images.reshape(len(images), -1)
    ink = (flat > 127).mean(1)
    assert ink.min() > 0.015, "a blank or nearly blank image"  # the thinnest are i, l, j: about 20 px
    assert ink.max() < 0.6, "a saturated image"
    assert (flat == 255).mean(1).max() < 0.35
    grey = ((flat > 0) & (flat < 255)).mean(1)
    assert grey.min() > 0.02, "strokes should have anti-aliased edges"
    assert 0.08 < flat.mean() / 255 < 0.35  # MNIST: 0.13


def test_cache_round_trip(tmp_path, monkeypatch):
    images, labels = hw.load_handwriting(n=200, seed=3, cache_dir=tmp_path)
    files = list(tmp_path.glob("*.npz"))
    assert len(files) == 1 and "n200-seed3-28px" in files[0].name

    def must_not_render(*args, **kwargs):
        raise AssertionError("the second call should read the cache")

    monkeypatch.setattr(hw, "render_handwriting", must_not_render)
    again_x, again_y = hw.load_handwriting(n=200, seed=3, cache_dir=tmp_path)
    assert again_x.dtype == np.uint8 and again_y.dtype == np.int64
    assert np.array_equal(again_x, images) and np.array_equal(again_y, labels)
    monkeypatch.undo()
    direct_x, direct_y = hw.render_handwriting(200, seed=3)
    assert np.array_equal(direct_x, images) and np.array_equal(direct_y, labels)


def test_cache_key_and_default_dir(tmp_path, monkeypatch):
    assert hw.cache_key(10, 0) == hw.cache_key(10, 0)
    assert len({hw.cache_key(10, 0), hw.cache_key(11, 0), hw.cache_key(10, 1), hw.cache_key(10, 0, 32)}) == 4
    fonts = hw.find_fonts()
    assert hw.cache_key(10, 0, fonts=fonts[:3]) != hw.cache_key(10, 0, fonts=fonts)
    monkeypatch.setenv(hw.CACHE_ENV, str(tmp_path / "cache"))
    assert hw.default_cache_dir() == tmp_path / "cache"
    monkeypatch.delenv(hw.CACHE_ENV)
    assert hw.default_cache_dir().parts[-3:] == (".cache", "stealguard", "handwriting")


def test_cli_writes_a_grid(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert hw.main(["--n", "16", "--cols", "4", "--out", str(out)]) == 0
    with Image.open(out) as im:
        assert im.size[0] > 4 * 28 and im.size[1] > 4 * 28
    assert "rendered 16 images" in capsys.readouterr().out
