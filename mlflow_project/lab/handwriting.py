"""An offline EMNIST-like set of handwritten characters, rendered from Debian handwriting fonts.

Why: the Prediction Poisoning protocol (Orekondy et al., ICLR 2020) queries MNIST-like victims with EMNIST,
the Knockoff Nets transfer set. EMNIST cannot be installed offline (no Debian or PyPI package ships its
images), so this module renders a stand-in from the handwriting fonts of six Debian packages
(:data:`HANDWRITING_FONT_PACKAGES`; ``apt-get install --no-install-recommends`` them).

How a sample is made (:func:`render_handwriting`, vectorised in batches of :data:`BATCH`):

1. a class uniformly from :data:`CHARSET` (62 classes in EMNIST ByClass order: ``0-9``, ``A-Z``, ``a-z``);
   then a hand (font family) uniformly among those with a usable glyph for it, then one of its faces;
2. a font size (so that the glyph's longer side is 52-66 px, about 3x its final 20 px) and a pen thickness
   (1.8-3.5 px of the final 20 px); FreeType renders the glyph white on black, thickened with Pillow's
   ``stroke_width`` when the face's own strokes are thinner than the pen;
3. one bilinear ``grid_sample`` applies a random affine map (rotation +-15 deg, shear +-0.3, x and y scale
   0.8-1.2 each, translation +-4 px) and a Simard et al. (2003) elastic field: uniform noise smoothed by a
   Gaussian of ``sigma = 4`` px, scaled by ``alpha`` drawn in 8-34 (Simard: 34), both in final-image pixels;
4. MNIST preprocessing: the ink's bounding box is scaled so that its longer side is 20 px (aspect kept) and
   its intensity centre of mass is put at the centre of the 28 x 28 frame, sampling a 4x finer grid that is
   box-filtered down; each image is then scaled so that its brightest pixel is 255.

Left out, because they would carry wrong or meaningless labels: code points a face lacks (the rendering
is empty or is the face's ``.notdef`` glyph), glyphs identical to an earlier character of the same face,
the lower case of unicase faces (the six ``fonts-bwht`` faces draw capitals for ``a-z``: detected by shape),
the outlined "bubble" digits and capitals of femkeklaver (``_EXCLUDED_GLYPHS``), and a second file of a
face already used (``fonts-breip`` ships Breip twice). :func:`glyph_table` lists what remains.

Limits, to keep in mind when reading results obtained with it:

- it is not handwriting from people: 15 faces of 11 hands, one glyph shape per character and face, varied
  only by the distortions above, where EMNIST has some 3,600 writers. Digits and capitals come from 10
  hands, lower case from 5 (Breip, femkeklaver, DkgHandwriting, Klee One, Rufscript);
- as in EMNIST ByClass, ``c/C, o/O, s/S, x/X, z/Z...`` and ``0/O, 1/l/I`` are hard or impossible to tell
  apart once size-normalised; strong elastic draws can also make a glyph illegible, as in Simard's data;
- the framing is MNIST's (20 px box, centre of mass), which suits MNIST-like victims, not EMNIST's own
  conversion (bounding box centred and nearly filling the frame, Gaussian-blurred); images are upright
  (the raw EMNIST files are transposed);
- the pixels depend on the installed fonts and on Pillow/FreeType/torch: the cache key covers the font files'
  contents and the library versions; bit-for-bit equality across machines also needs the same CPU kernels
  (torch dispatches on the instruction set), and a few grey levels may differ otherwise.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import string
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from mlflow_project.lab.training import torch_threads

FORMAT_VERSION = 1  # bump whenever a change alters the rendered pixels: it invalidates every cache file

HANDWRITING_FONT_PACKAGES = (
    "fonts-bwht",
    "fonts-dkg-handwriting",
    "fonts-breip",
    "fonts-femkeklaver",
    "fonts-klee",
    "fonts-rufscript",
)
# The directory (under /usr/share/fonts/{truetype,opentype}/) each package installs its fonts into.
_PACKAGE_FONT_DIRS = {
    "fonts-bwht": "bwht",
    "fonts-dkg-handwriting": "fifthhorseman",
    "fonts-breip": "breip",
    "fonts-femkeklaver": "femkeklaver",
    "fonts-klee": "klee",
    "fonts-rufscript": "rufscript",
}
FONT_ROOT = Path("/usr/share/fonts")
FONT_SUFFIXES = (".ttf", ".otf")
CACHE_ENV = "STEALGUARD_DATA_CACHE"

CHARSET = string.digits + string.ascii_uppercase + string.ascii_lowercase  # EMNIST ByClass order, 62 classes
NUM_CLASSES = len(CHARSET)

# Glyphs that render but are unlike handwriting, by font family: femkeklaver's digits and capitals are
# sketched outline ("bubble") letters; its lower case is ordinary handwriting and is kept.
_EXCLUDED_GLYPHS = {"femkeklaver": string.digits + string.ascii_uppercase}
# Letters whose lower-case form differs from the capital in ordinary handwriting. A font whose lower-case
# versions of these look like its capitals (median normalised cosine similarity >= the threshold) is unicase.
_DISTINCT_LOWER = "abdefghnqrt"
_UNICASE_SIMILARITY = 0.7

# Geometry, in source pixels of the high-resolution canvas unless said otherwise.
CANVAS = 112  # square canvas a glyph is rendered and distorted on ((CANVAS - 1) % _FIELD_STEP == 0)
GLYPH_SIDE = (52.0, 66.0)  # a glyph's longer side after the affine scaling, source px (2.6-3.3x the final BOX)
PEN = (1.8, 3.5)  # pen thickness in final px (for the BOX px side; fonts with thinner strokes are thickened)
ROTATION_DEG = 15.0
SHEAR = 0.3
SCALE = (0.8, 1.2)  # drawn independently for x and y: also varies the aspect ratio
TRANSLATION = 4.0  # source px; the final centring undoes it (kept to vary sub-pixel phase)
ELASTIC_SIGMA = 4.0  # final px (Simard et al. 2003: sigma = 4, alpha = 34 on 28 x 28 digits)
ELASTIC_ALPHA = (8.0, 34.0)
_FIELD_STEP = 3  # the elastic field lives on the canvas's pixel centres 0, 3, 6...: (CANVAS - 1) / 3 + 1 nodes
# MNIST-style framing, for a 28 px frame (scaled for other sizes).
BOX = 20  # the longer side of the ink's bounding box, in final px
SUPERSAMPLE = 4  # final images are box-filtered from a grid 4x finer
INK_THRESHOLD = 0.25  # a pixel belongs to the bounding box above this intensity (in [0, 1])
BATCH = 128  # samples per vectorised batch; sample i depends only on (seed, i // BATCH, i % BATCH)
_REF_SIZE = 100  # font size used to measure a font's glyphs
_SIZE_STEP = 2**0.25  # fonts are rasterised at sizes 2 ** (k / 4), rounded


# --------------------------------------------------------------------------------------------- fonts


def find_fonts(root: str | os.PathLike | None = None) -> list[Path]:
    """The font files (TTF/OTF) of :data:`HANDWRITING_FONT_PACKAGES` under ``root`` (default /usr/share/fonts),
    sorted. Raises RuntimeError, with the command that installs them, when there is none."""
    root = Path(root) if root is not None else FONT_ROOT
    dirs = set(_PACKAGE_FONT_DIRS.values())
    found = []
    if root.is_dir():
        found = [
            p for p in root.rglob("*") if p.suffix.lower() in FONT_SUFFIXES and p.parent.name in dirs and p.is_file()
        ]
    if not found:
        packages = " ".join(HANDWRITING_FONT_PACKAGES)
        raise RuntimeError(
            f"no handwriting font found under {root} (looked for .ttf/.otf files of the Debian packages "
            f"{', '.join(HANDWRITING_FONT_PACKAGES)}). Install them with:\n"
            f"    apt-get install --no-install-recommends {packages}"
        )
    return sorted(found)


@dataclass(frozen=True)
class FontGlyphs:
    """One usable face: its file, name, the CHARSET characters it contributes and two measured proportions."""

    path: Path
    name: str  # family and style
    family: str
    chars: str
    cap_ratio: float  # cap height in px per px of font size
    thickness: float  # the face's own stroke thickness as a fraction of its cap height
    sides: tuple[float, ...]  # each character's longer ink side in px per px of font size (aligned with chars)


@functools.lru_cache(maxsize=512)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size, layout_engine=ImageFont.Layout.BASIC)


def _glyph_image(font: ImageFont.FreeTypeFont, ch: str) -> np.ndarray:
    """The glyph cropped to its ink (uint8, white on black); an empty array when it has no ink."""
    left, top, right, bottom = font.getbbox(ch)
    if right <= left or bottom <= top:
        return np.zeros((0, 0), np.uint8)
    im = Image.new("L", (int(math.ceil(right - left)) + 4, int(math.ceil(bottom - top)) + 4))
    ImageDraw.Draw(im).text((2 - left, 2 - top), ch, font=font, fill=255)
    a = np.asarray(im)
    rows, cols = np.flatnonzero(a.any(1)), np.flatnonzero(a.any(0))
    if rows.size == 0:
        return np.zeros((0, 0), np.uint8)
    return a[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def _shape(a: np.ndarray, side: int = 32) -> np.ndarray:
    """A glyph scaled (aspect kept) into a side x side frame and L2-normalised, to compare shapes."""
    h, w = a.shape
    s = (side - 4) / max(h, w)
    im = Image.fromarray(a).resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BILINEAR)
    out = np.zeros((side, side), np.float64)
    y0, x0 = (side - im.size[1]) // 2, (side - im.size[0]) // 2
    out[y0 : y0 + im.size[1], x0 : x0 + im.size[0]] = np.asarray(im, np.float64)
    return out / max(np.linalg.norm(out), 1e-12)


def _stroke_thickness(a: np.ndarray) -> float:
    """Mean stroke thickness of a glyph in px: 2 * area / perimeter of its binarised ink."""
    ink = np.pad(a > 127, 1)
    interior = ink[1:-1, 1:-1] & ink[:-2, 1:-1] & ink[2:, 1:-1] & ink[1:-1, :-2] & ink[1:-1, 2:]
    area = int(ink.sum())
    boundary = area - int(interior.sum())
    return 2.0 * area / max(boundary, 1)


def _measure_font(path: Path) -> FontGlyphs | None:
    font = _font(str(path), _REF_SIZE)
    family, style = font.getname()
    name = f"{family} {style}".strip()
    excluded = _EXCLUDED_GLYPHS.get(str(family).lower(), "")
    notdef = _glyph_image(font, "\uffff")  # a non-character: no font maps it, so FreeType draws .notdef
    glyphs: dict[str, np.ndarray] = {}
    seen: set[tuple[tuple[int, int], bytes]] = set()
    for ch in CHARSET:
        a = _glyph_image(font, ch)
        if a.size == 0 or (a.shape == notdef.shape and np.array_equal(a, notdef)):
            continue  # missing glyph
        key = (a.shape, a.tobytes())
        if key in seen:
            continue  # the same glyph as an earlier character: its label would be ambiguous
        seen.add(key)
        if ch not in excluded:
            glyphs[ch] = a
    pairs = [c for c in _DISTINCT_LOWER if c in glyphs and c.upper() in glyphs]
    if pairs:
        similarity = np.median([float((_shape(glyphs[c]) * _shape(glyphs[c.upper()])).sum()) for c in pairs])
        if similarity >= _UNICASE_SIMILARITY:
            glyphs = {c: a for c, a in glyphs.items() if not c.islower()}
    if not glyphs:
        return None
    tall = [glyphs[c].shape[0] for c in glyphs if c.isdigit() or c.isupper()] or [a.shape[0] for a in glyphs.values()]
    cap = float(np.median(tall))
    thickness = float(np.median([_stroke_thickness(a) for a in glyphs.values()])) / cap
    chars = "".join(c for c in CHARSET if c in glyphs)
    sides = tuple(max(glyphs[c].shape) / _REF_SIZE for c in chars)
    return FontGlyphs(
        path=path,
        name=name,
        family=str(family),
        chars=chars,
        cap_ratio=cap / _REF_SIZE,
        thickness=thickness,
        sides=sides,
    )


@functools.lru_cache(maxsize=8)
def _glyph_table_cached(paths: tuple[str, ...]) -> tuple[FontGlyphs, ...]:
    table, names = [], set()
    for p in paths:
        fg = _measure_font(Path(p))
        if fg is None or fg.name in names:
            continue  # no usable glyph, or another file of a face already in the table
        names.add(fg.name)
        table.append(fg)
    return tuple(table)


def glyph_table(fonts: Sequence[str | os.PathLike] | None = None) -> tuple[FontGlyphs, ...]:
    """The usable faces among ``fonts`` (default :func:`find_fonts`), one per face, with their characters."""
    paths = tuple(str(p) for p in (fonts if fonts is not None else find_fonts()))
    table = _glyph_table_cached(paths)
    if not table:
        raise RuntimeError(f"none of the fonts {list(paths)} has a usable glyph of CHARSET")
    return table


# --------------------------------------------------------------------------------------------- rendering


def _gaussian_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Normalised 1-D Gaussian kernels, one row per sigma: (len(sigma), 2 * radius + 1)."""
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x[None, :] / sigma[:, None]) ** 2)
    return k / k.sum(1, keepdim=True)


def _simard_std(alpha: np.ndarray, sigma: float) -> np.ndarray:
    """Standard deviation (final px) of Simard's field alpha * G_sigma * U(-1, 1) on a unit-spaced grid."""
    radius = int(math.ceil(3 * sigma))
    g = _gaussian_kernels(torch.tensor([sigma]), radius)[0].double().numpy()
    return alpha * float((g**2).sum()) / math.sqrt(3.0)


def _elastic_field(noise: np.ndarray, sigma_cells: np.ndarray, std_px: np.ndarray) -> torch.Tensor:
    """Smooth per-sample uniform noise (B, 2, G, G) with per-sample Gaussians (sigma in grid cells) and scale it
    to a displacement of standard deviation ``std_px`` source px: (B, 2, G, G), components (x, y)."""
    b, _, g, _ = noise.shape
    sigma = torch.from_numpy(np.repeat(sigma_cells, 2)).float()  # one kernel per (sample, component)
    radius = min(int(math.ceil(3 * float(sigma.max()))), g - 1)
    k = _gaussian_kernels(sigma, radius)  # (2B, K)
    x = torch.from_numpy(noise).float().reshape(1, 2 * b, g, g)
    x = F.pad(x, (radius, radius, radius, radius), mode="circular")  # keeps the field stationary
    x = F.conv2d(x, k[:, None, :, None], groups=2 * b)  # along y
    x = F.conv2d(x, k[:, None, None, :], groups=2 * b)  # along x
    unit_std = (k**2).sum(1) / math.sqrt(3.0)  # std of the smoothed U(-1, 1) noise, per kernel
    x = x.reshape(b, 2, g, g) / unit_std.reshape(b, 2, 1, 1)
    return x * torch.from_numpy(std_px).float().reshape(b, 1, 1, 1)


@dataclass
class _BatchParams:
    labels: np.ndarray
    font_u: np.ndarray
    side: np.ndarray
    pen: np.ndarray
    rotation: np.ndarray
    shear: np.ndarray
    scale: np.ndarray  # (B, 2): x, y
    translation: np.ndarray  # (B, 2): x, y in source px
    alpha: np.ndarray
    noise: np.ndarray  # (B, 2, G, G) in [-1, 1)


def _draw_params(rng: np.random.Generator, classes: np.ndarray, m: int = BATCH) -> _BatchParams:
    """Draw a full BATCH of parameters (so a sample's draws do not depend on how many are kept), keep m."""
    b = BATCH
    g = (CANVAS - 1) // _FIELD_STEP + 1
    p = _BatchParams(
        labels=classes[rng.integers(0, len(classes), b)],
        font_u=rng.random(b),
        side=rng.uniform(*GLYPH_SIDE, b),
        pen=rng.uniform(*PEN, b),
        rotation=np.deg2rad(rng.uniform(-ROTATION_DEG, ROTATION_DEG, b)),
        shear=rng.uniform(-SHEAR, SHEAR, b),
        scale=rng.uniform(*SCALE, (b, 2)),
        translation=rng.uniform(-TRANSLATION, TRANSLATION, (b, 2)),
        alpha=rng.uniform(*ELASTIC_ALPHA, b),
        noise=rng.uniform(-1.0, 1.0, (b, 2, g, g)).astype(np.float32),
    )
    for name, value in vars(p).items():
        setattr(p, name, value[:m])
    return p


def _hands(table: Sequence[FontGlyphs]) -> list[list[list[FontGlyphs]]]:
    """For each CHARSET class, the faces that have it grouped by family ("hand"): [class][hand][face]."""
    out = []
    for ch in CHARSET:
        by_family: dict[str, list[FontGlyphs]] = {}
        for fg in table:
            if ch in fg.chars:
                by_family.setdefault(fg.family, []).append(fg)
        out.append(list(by_family.values()))
    return out


def _choose_faces(p: _BatchParams, hands: list[list[list[FontGlyphs]]]) -> list[FontGlyphs]:
    """Each sample's face: a hand uniformly among those having its character, then one of the hand's faces
    (so the four DkgHandwriting styles together weigh as much as one Because-We face), from one uniform draw."""
    faces = []
    for label, u in zip(p.labels, p.font_u, strict=True):
        families = hands[label]
        k = min(int(u * len(families)), len(families) - 1)
        members = families[k]
        faces.append(members[min(int((u * len(families) - k) * len(members)), len(members) - 1)])
    return faces


def _render_glyphs(p: _BatchParams, faces: list[FontGlyphs]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rasterise each sample's glyph centred on the canvas. Returns images (m, C, C) uint8, each glyph's longer
    side in source px and the residual scale that brings it to the size drawn (fonts are rendered at a few
    discrete sizes, the rest of the scaling is left to the affine map)."""
    m = len(p.labels)
    canvas = np.zeros((m, CANVAS, CANVAS), np.uint8)
    longest = np.zeros(m)
    residual = np.ones(m)
    centre = CANVAS / 2
    for i in range(m):
        ch = CHARSET[p.labels[i]]
        fg = faces[i]
        # Font size: the glyph's longer side becomes p.side source px once scaled by the affine map, so every
        # glyph, small or tall, is rasterised at about 3x the resolution it ends up at. Sizes are rounded to
        # a geometric ladder (few FreeType faces to open); the residual factor goes into the affine map.
        target = p.side[i] / p.scale[i].max()
        wanted = target / fg.sides[fg.chars.index(ch)]
        size = max(8, round(_SIZE_STEP ** round(math.log(wanted) / math.log(_SIZE_STEP))))
        font = _font(str(fg.path), size)
        left, top, right, bottom = font.getbbox(ch)
        side = max(right - left, bottom - top, 1)
        residual[i] = target / side
        # The pen is relative to this glyph's longer side (which becomes BOX px), so that small glyphs (o, s, x)
        # are not blobs once magnified; the face's own strokes (thickness * cap height px) count towards it.
        stroke = max(0.0, (p.pen[i] / BOX * side - fg.thickness * size * fg.cap_ratio) / 2.0)
        left, top, right, bottom = font.getbbox(ch, stroke_width=stroke)
        longest[i] = max(right - left, bottom - top) * residual[i]
        im = Image.new("L", (CANVAS, CANVAS))
        xy = (centre - (left + right) / 2, centre - (top + bottom) / 2)
        ImageDraw.Draw(im).text(xy, ch, font=font, fill=255, stroke_width=stroke, stroke_fill=255)
        canvas[i] = np.asarray(im)
    return canvas, longest, residual


def _distort(canvas: np.ndarray, longest: np.ndarray, residual: np.ndarray, p: _BatchParams) -> torch.Tensor:
    """Affine map + elastic field in one bilinear resampling: (m, 1, C, C) float in [0, 1]."""
    m = canvas.shape[0]
    x = torch.from_numpy(canvas).float().div_(255.0)[:, None]
    cos, sin = np.cos(p.rotation), np.sin(p.rotation)
    rot = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)  # (m, 2, 2)
    shear = np.zeros((m, 2, 2))
    shear[:, 0, 0] = shear[:, 1, 1] = 1.0
    shear[:, 0, 1] = p.shear
    scale = p.scale * residual[:, None]
    forward = rot @ shear @ (np.eye(2)[None] * scale[:, None, :])  # glyph -> distorted, about the centre
    inv = torch.from_numpy(np.linalg.inv(forward)).float()
    half = CANVAS / 2  # grid_sample's normalised coordinates are source px about the centre / half

    # A point q of the distorted image (about the centre) shows the glyph at inverse @ (q + d(q) - t), d being
    # the elastic field. That map is computed on a coarse grid of nodes lying on every _FIELD_STEP-th pixel
    # centre and upsampled bilinearly with align_corners=True, which is exact for its affine part and smooth
    # for the field. One final px is (longest side after scaling) / BOX source px.
    px_per_final = longest * p.scale.mean(1) / BOX
    field = _elastic_field(
        p.noise, ELASTIC_SIGMA * px_per_final / _FIELD_STEP, _simard_std(p.alpha, ELASTIC_SIGMA) * px_per_final
    )
    nodes = torch.arange(0, CANVAS, _FIELD_STEP, dtype=torch.float32) + 0.5 - half
    g = len(nodes)
    q = torch.stack([nodes[None, :].expand(g, g), nodes[:, None].expand(g, g)])[None] + field
    q = q - torch.from_numpy(p.translation).float()[:, :, None, None]
    coarse = torch.einsum("bij,bjhw->bihw", inv, q) / half
    grid = F.interpolate(coarse, size=(CANVAS, CANVAS), mode="bilinear", align_corners=True).permute(0, 2, 3, 1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _frame(x: torch.Tensor, size: int) -> torch.Tensor:
    """MNIST preprocessing: bounding box to a BOX px longer side, centre of mass to the frame's centre,
    supersampled and box-filtered; (m, size, size) float in [0, 1] with each image's maximum at 1."""
    m, _, h, w = x.shape
    img = x[:, 0]
    ink = img > INK_THRESHOLD
    idx_y = torch.arange(h)
    idx_x = torch.arange(w)
    rows, cols = ink.any(2), ink.any(1)
    has_ink = rows.any(1)
    y0 = torch.where(rows, idx_y, h).amin(1)
    y1 = torch.where(rows, idx_y, -1).amax(1)
    x0 = torch.where(cols, idx_x, w).amin(1)
    x1 = torch.where(cols, idx_x, -1).amax(1)
    side = torch.maximum(y1 - y0 + 1, x1 - x0 + 1).clamp(min=1).float()
    side = torch.where(has_ink, side, torch.full_like(side, float(h)))
    box = BOX * size / 28.0
    scale = box / side  # final px per source px
    mass = img.sum((1, 2)).clamp(min=1e-6)
    cy = (img.sum(2) * (idx_y.float() + 0.5)).sum(1) / mass
    cx = (img.sum(1) * (idx_x.float() + 0.5)).sum(1) / mass

    n_out = size * SUPERSAMPLE
    o = (torch.arange(n_out, dtype=torch.float32) + 0.5) / SUPERSAMPLE - size / 2  # final px about the centre
    sy = o[None, :] / scale[:, None] + cy[:, None]  # source px, (m, n_out)
    sx = o[None, :] / scale[:, None] + cx[:, None]
    grid = torch.stack(
        [
            (sx / (w / 2) - 1)[:, None, :].expand(m, n_out, n_out),
            (sy / (h / 2) - 1)[:, :, None].expand(m, n_out, n_out),
        ],
        -1,
    )
    fine = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out = F.avg_pool2d(fine, SUPERSAMPLE)[:, 0]
    peak = out.amax((1, 2), keepdim=True).clamp(min=1e-6)
    return out / peak


def _plan(fonts: Sequence[str | os.PathLike] | None) -> tuple[list[list[list[FontGlyphs]]], np.ndarray]:
    hands = _hands(glyph_table(fonts))
    return hands, np.array([c for c in range(NUM_CLASSES) if hands[c]], np.int64)


def sample_faces(n: int, seed: int, fonts: Sequence[str | os.PathLike] | None = None) -> list[str]:
    """The face ("family style") each of the ``n`` images of ``render_handwriting(n, seed)`` is drawn in,
    without rendering anything (the same random draws, replayed)."""
    hands, classes = _plan(fonts)
    names: list[str] = []
    for b, start in enumerate(range(0, n, BATCH)):
        p = _draw_params(np.random.default_rng([seed, b]), classes, min(BATCH, n - start))
        names.extend(fg.name for fg in _choose_faces(p, hands))
    return names


def render_handwriting(
    n: int,
    seed: int,
    size: int = 28,
    *,
    progress: bool = False,
    fonts: Sequence[str | os.PathLike] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Render ``n`` EMNIST-like characters: images (n, size, size) uint8 in 0..255 (white ink on black) and
    labels (n,) int64, indices into :data:`CHARSET`. Deterministic given (n, seed), the fonts and the
    Pillow/FreeType version; the first k images of a set are the k images of a smaller set with the same seed.
    ``fonts`` defaults to :func:`find_fonts`; ``progress`` shows a tqdm bar."""
    if n < 0 or seed < 0 or size < 8:
        raise ValueError(f"need n >= 0, seed >= 0 and size >= 8; got n={n}, seed={seed}, size={size}")
    hands, classes = _plan(fonts)
    images = np.zeros((n, size, size), np.uint8)
    labels = np.zeros(n, np.int64)
    starts = range(0, n, BATCH)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="handwriting", unit="img")
    with torch_threads(1), torch.no_grad():
        for b, start in enumerate(starts):
            m = min(BATCH, n - start)
            # Always a full batch, even for the last one: torch may pick other kernels for other shapes, and
            # float differences would flip a few grey levels between sets of different n.
            p = _draw_params(np.random.default_rng([seed, b]), classes)
            canvas, longest, residual = _render_glyphs(p, _choose_faces(p, hands))
            framed = _frame(_distort(canvas, longest, residual, p), size)[:m]
            images[start : start + m] = framed.mul(255.0).round_().clamp_(0, 255).to(torch.uint8).numpy()
            labels[start : start + m] = p.labels[:m]
            if bar is not None:
                bar.update(m)
    if bar is not None:
        bar.close()
    return images, labels


# --------------------------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    """``$STEALGUARD_DATA_CACHE`` if set, else ``~/.cache/stealguard/handwriting``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "stealguard" / "handwriting"


@functools.lru_cache(maxsize=64)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _fonts_digest(fonts: Sequence[Path]) -> str:
    """A hash of the font files' paths and contents (each file's digest is memoised by size and mtime)."""
    h = hashlib.sha256()
    for p in fonts:
        st = p.stat()
        h.update(f"{p}\0{_file_digest(str(p), st.st_size, st.st_mtime_ns)}\0".encode())
    return h.hexdigest()


def cache_key(n: int, seed: int, size: int = 28, fonts: Sequence[str | os.PathLike] | None = None) -> str:
    """What identifies a rendered set: format version, n, seed, size, the font files (paths and contents),
    the charset and the versions of the libraries that draw the pixels."""
    from PIL import __version__ as pil_version
    from PIL import features

    fonts = [Path(p) for p in (fonts if fonts is not None else find_fonts())]
    meta = {
        "format_version": FORMAT_VERSION,
        "n": n,
        "seed": seed,
        "size": size,
        "charset": CHARSET,
        "fonts": _fonts_digest(fonts),
        "pillow": pil_version,
        "freetype": features.version("freetype2"),
        "torch": torch.__version__.split("+")[0],
    }
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def cache_path(
    n: int,
    seed: int,
    size: int = 28,
    cache_dir: str | os.PathLike | None = None,
    fonts: Sequence[str | os.PathLike] | None = None,
) -> Path:
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return directory / f"handwriting-n{n}-seed{seed}-{size}px-{cache_key(n, seed, size, fonts)[:16]}.npz"


def load_handwriting(
    n: int = 60000,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    *,
    size: int = 28,
    progress: bool = False,
    fonts: Sequence[str | os.PathLike] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`render_handwriting` through a compressed .npz cache in ``cache_dir`` (default
    :func:`default_cache_dir`). Returns images (n, size, size) uint8 and labels (n,) int64."""
    fonts = [Path(p) for p in (fonts if fonts is not None else find_fonts())]
    path = cache_path(n, seed, size, cache_dir, fonts)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                images, labels = z["images"], z["labels"]
            if images.shape == (n, size, size) and images.dtype == np.uint8 and labels.shape == (n,):
                return images, labels.astype(np.int64, copy=False)
        except (OSError, ValueError, KeyError):
            pass  # a truncated or foreign file: render again and overwrite it
    images, labels = render_handwriting(n, seed, size, progress=progress, fonts=fonts)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, images=images, labels=labels, charset=np.array(CHARSET))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return images, labels


# --------------------------------------------------------------------------------------------- CLI


def save_grid(images: np.ndarray, labels: np.ndarray, out: str | os.PathLike, cols: int = 8, zoom: int = 3) -> Path:
    """Tile images (with their characters written underneath) into a PNG for eyeballing."""
    n, h, w = images.shape
    cols = max(1, min(cols, n))
    rows = max(1, math.ceil(n / cols))
    cell_w, cell_h = w * zoom + 4, h * zoom + 16
    sheet = Image.new("L", (cols * cell_w, rows * cell_h), 64)
    draw = ImageDraw.Draw(sheet)
    for i in range(n):
        r, c = divmod(i, cols)
        tile = Image.fromarray(images[i]).resize((w * zoom, h * zoom), Image.Resampling.NEAREST)
        sheet.paste(tile, (c * cell_w + 2, r * cell_h + 2))
        draw.text((c * cell_w + 2, r * cell_h + h * zoom + 3), repr(CHARSET[labels[i]]), fill=255)
    out = Path(out)
    sheet.save(out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64, help="how many characters to render")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--cols", type=int, default=8)
    ap.add_argument("--out", default="handwriting_grid.png", help="PNG to write the grid to")
    ap.add_argument("--fonts", action="store_true", help="list the faces used and their characters")
    args = ap.parse_args(argv)
    if args.fonts:
        for fg in glyph_table():
            print(f"{fg.name:28s} {len(fg.chars):2d} chars  {fg.path}")
    t0 = time.perf_counter()
    images, labels = render_handwriting(args.n, args.seed, args.size, progress=args.n > 5000)
    dt = time.perf_counter() - t0
    out = save_grid(images, labels, args.out, cols=args.cols)
    print(f"rendered {args.n} images in {dt:.2f} s; grid written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
