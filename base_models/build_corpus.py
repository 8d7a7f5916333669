"""Build the broad pretraining corpus: glyphs from Debian's fonts, drawn like handwriting, + Fashion-MNIST.

Offline and reproducible: the fonts come from Debian packages (``APT_FONTS``; installed with
apt-get when run as root and missing), each font's cmap is read with fontTools, a candidate
character of ``base_models/glyph_classes.py`` (no digits, no digit look-alikes, no twins) becomes
a class where at least ``--min-families`` font families have it, and every render is drawn from
a seeded generator keyed by (seed, class, split), so the same command writes the same bytes.

Each render, MNIST-style (white ink on black, 32x32 uint8):

1. the glyph at 96 px, cropped to its ink, scaled so its longer side is 80 px (a 20 px box at
   32 px, as MNIST's digits fill 20 of 28 px) - done once per (font, class);
2. strokes set to 2-3 px at 32 px (MNIST's pen): the stroke width is estimated as
   2 x ink area / boundary pixels and the glyph dilated (or, for heavy faces, eroded) towards a
   width drawn from U(2, 3) px;
3. centred by its centre of mass on a 128 px canvas, then one warp: rotation U(-12, 12) deg,
   slant (shear) U(-0.3, 0.3), scale U(0.85, 1.15), shift U(-2, 2) px and an elastic field
   (a 4x4 grid of N(0, 0.6 px) displacements, bicubically upsampled);
4. 4x4 average pooling to 32x32.

Fashion-MNIST (Debian's ``dataset-fashion-mnist`` IDX files) adds its 10 classes after the
glyphs: ``--per-class`` images per class from the train split, ``--heldout-per-class`` from the
t10k split; 28x28 zero-padded to 32x32. They are the only classes training may mirror
(``flip_classes`` in corpus.json).

Writes ``--out`` (default ``base_models/_corpus/broad``, git-ignored)::

    train_images.npy   uint8 [N, 32, 32]     train_labels.npy    int16 [N]
    heldout_images.npy uint8 [M, 32, 32]     heldout_labels.npy  int16 [M]
    labels.json        class names in label order
    corpus.json        settings, fonts, per-class font counts, exclusions, flip_classes, sha256s

Usage (from the repository root)::

    .venv/bin/python base_models/build_corpus.py                       # the full corpus
    .venv/bin/python base_models/build_corpus.py --max-classes 6 --per-class 8 --out /tmp/c
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter, ImageFont

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from base_models.glyph_classes import EXCLUDED, candidates, class_name, is_digit_like  # noqa: E402
from base_models.tiny import FASHION  # noqa: E402

# Debian font packages the corpus is rendered from: text faces (serif, sans, mono) and the
# handwriting / script faces, so the corpus has pen-drawn shapes as well as typeset ones.
APT_FONTS = [
    "fonts-dejavu-core", "fonts-liberation", "fonts-freefont-ttf", "fonts-urw-base35",
    "fonts-cantarell", "fonts-lato", "fonts-crosextra-caladea", "fonts-crosextra-carlito",
    "fonts-linuxlibertine", "fonts-texgyre", "fonts-sil-andika", "fonts-sil-gentium",
    "fonts-sil-charis", "fonts-sil-doulos", "fonts-roboto-unhinted", "fonts-open-sans",
    "fonts-junicode", "fonts-cardo", "fonts-quicksand", "fonts-comfortaa", "fonts-jura",
    "fonts-anonymous-pro", "fonts-cabin", "fonts-hack", "fonts-inconsolata", "fonts-go",
    "fonts-oldstandard", "fonts-tuffy", "fonts-yanone-kaffeesatz", "fonts-paratype",
    "fonts-firacode", "fonts-averia-gwf", "fonts-averia-sans-gwf", "fonts-averia-serif-gwf",
    "fonts-goudybookletter", "fonts-oflb-euterpe",
    # handwriting and script faces
    "fonts-breip", "fonts-humor-sans", "fonts-comic-neue", "fonts-dkg-handwriting",
    "fonts-femkeklaver", "fonts-bwht", "fonts-ecolier-court", "fonts-ecolier-lignes-court",
    "fonts-kaushanscript", "fonts-dancingscript", "fonts-lobster", "fonts-lobstertwo",
    "fonts-staypuft", "fonts-isabella",
]  # fmt: skip
APT_DATA = ["dataset-fashion-mnist"]
# Families whose cmap lies about the glyphs: left out, with the reason.
SKIP_FAMILIES = {
    "Standard Symbols PS": "Symbol-encoded (urw-base35): its cmap maps Latin letters to Greek glyphs",
}
FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
FONT_SUFFIXES = (".ttf", ".otf")
GLYPH_PX, BOX_PX, HI, SIZE = 96, 80, 128, 32  # render size, box at 4x, 4x canvas, output


# -- fonts -----------------------------------------------------------------------------------


def missing_packages(packages: list[str]) -> list[str]:
    """The packages of ``packages`` dpkg does not list as installed."""
    out = []
    for pkg in packages:
        r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True)
        if "install ok installed" not in r.stdout:
            out.append(pkg)
    return out


def ensure_packages(packages: list[str]) -> None:
    """apt-get install the missing packages (once ``apt-get update``) when running as root."""
    missing = missing_packages(packages)
    if not missing:
        return
    if os.geteuid() != 0:
        print(f"not root: cannot install {' '.join(missing)}; using what is installed", flush=True)
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *missing], check=True, env=env)


def package_fonts(packages: list[str]) -> list[Path]:
    """The .ttf/.otf files the installed packages ship, sorted (a stable order)."""
    files: set[Path] = set()
    for pkg in packages:
        r = subprocess.run(["dpkg", "-L", pkg], capture_output=True, text=True)
        for line in r.stdout.splitlines():
            p = Path(line)
            if p.suffix.lower() in FONT_SUFFIXES and p.is_file() and not p.is_symlink():
                files.add(p)
    return sorted(files)


@dataclass(frozen=True)
class Font:
    path: Path
    family: str  # name ID 16 (typographic family) or 1
    chars: frozenset[str]


def read_font(path: Path) -> Font | None:
    """A font's family and the characters its Unicode cmap maps; None if fontTools cannot read it."""
    from fontTools.ttLib import TTFont

    try:
        with TTFont(str(path), lazy=True, fontNumber=0) as tt:
            cmap = tt.getBestCmap() or {}
            name = tt["name"]
            family = name.getDebugName(16) or name.getDebugName(1) or path.stem
    except Exception as e:  # a broken or unsupported file: skip it, say so
        print(f"skipping {path}: {e}", flush=True)
        return None
    return Font(path, family, frozenset(chr(c) for c in cmap))


# -- rendering -------------------------------------------------------------------------------


def glyph_box(font: ImageFont.FreeTypeFont, ch: str) -> np.ndarray | None:
    """The glyph cropped to its ink and scaled so its longer side is BOX_PX: float32 [h, w] in [0, 1]."""
    canvas = Image.new("L", (3 * GLYPH_PX, 3 * GLYPH_PX), 0)
    ImageDraw.Draw(canvas).text((GLYPH_PX, GLYPH_PX), ch, fill=255, font=font)
    bbox = canvas.getbbox()
    if bbox is None:
        return None
    crop = canvas.crop(bbox)
    w, h = crop.size
    scale = BOX_PX / max(w, h)
    crop = crop.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.LANCZOS)
    return np.asarray(crop, dtype=np.float32) / 255.0


def stroke_width(ink: np.ndarray) -> float:
    """Mean stroke width in pixels of a [h, w] ink image: 2 x area / boundary pixels."""
    b = ink > 0.5
    area = int(b.sum())
    if area == 0:
        return 0.0
    p = np.pad(b, 1)
    inner = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    boundary = area - int(inner.sum())
    return 2.0 * area / max(1, boundary)


def set_stroke(ink: np.ndarray, target: float) -> np.ndarray:
    """Dilate (or, for a stroke over 1.5x the target, erode) [h, w] ink towards ``target`` px."""
    w = stroke_width(ink)
    img = Image.fromarray(np.pad((ink * 255).round().astype(np.uint8), 8))
    if w < target:
        k = 2 * int(round((target - w) / 2)) + 1
        if k > 1:
            img = img.filter(ImageFilter.MaxFilter(k))
    elif w > 1.5 * target:
        k = min(5, 2 * int(round((w - target) / 2)) + 1)
        if k > 1:
            img = img.filter(ImageFilter.MinFilter(k))
    return np.asarray(img, dtype=np.float32) / 255.0


def centred(ink: np.ndarray) -> np.ndarray:
    """[h, w] ink placed on a [HI, HI] canvas with its centre of mass at the centre (clipped)."""
    h, w = ink.shape
    total = float(ink.sum()) or 1.0
    cy = float((ink.sum(1) * np.arange(h)).sum()) / total
    cx = float((ink.sum(0) * np.arange(w)).sum()) / total
    top, left = int(round(HI / 2 - cy)), int(round(HI / 2 - cx))
    out = np.zeros((HI, HI), np.float32)
    ys, xs = max(0, -top), max(0, -left)
    ye, xe = min(h, HI - top), min(w, HI - left)
    out[top + ys : top + ye, left + xs : left + xe] = ink[ys:ye, xs:xe]
    return out


def warp(canvases: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[B, HI, HI] float in [0, 1] -> [B, SIZE, SIZE] uint8: random affine + elastic, 4x4 pooled."""
    b = canvases.shape[0]
    rot = np.deg2rad(rng.uniform(-12, 12, b))
    shear = rng.uniform(-0.3, 0.3, b)
    scale = rng.uniform(0.85, 1.15, b)
    shift = rng.uniform(-2, 2, (b, 2)) * (2.0 / SIZE)  # px at 32 -> normalised coordinates
    elastic = rng.normal(0.0, 0.6 * 2.0 / SIZE, (b, 2, 4, 4))
    # theta maps output coordinates to input ones: the inverse of scale . rotation . shear
    cos, sin = np.cos(rot), np.sin(rot)
    fwd = np.zeros((b, 2, 2))
    fwd[:, 0, 0], fwd[:, 0, 1] = cos, -sin + cos * shear
    fwd[:, 1, 0], fwd[:, 1, 1] = sin, cos + sin * shear
    fwd *= scale[:, None, None]
    inv = np.linalg.inv(fwd)
    theta = np.concatenate([inv, -(inv @ shift[:, :, None])], axis=2)
    grid = F.affine_grid(torch.from_numpy(theta).float(), [b, 1, HI, HI], align_corners=False)
    field = F.interpolate(
        torch.from_numpy(elastic).float(), size=(HI, HI), mode="bicubic", align_corners=True
    )
    grid = grid + field.permute(0, 2, 3, 1)
    x = torch.from_numpy(canvases).float()[:, None]
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out = F.avg_pool2d(out, HI // SIZE)[:, 0]
    return (out.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def render_class(
    boxes: list[np.ndarray], n: int, seed: int, label: int, split: int, batch: int = 256
) -> np.ndarray:
    """``n`` renders [n, SIZE, SIZE] uint8 of one class from its per-font glyph boxes.

    Fonts are used in turn (a seeded order), so each contributes about n / len(boxes) renders.
    """
    rng = np.random.default_rng([seed, label, split])
    order = rng.permutation(len(boxes))
    widths = rng.uniform(2.0, 3.0, n) * (HI // SIZE)
    canvases = np.stack([centred(set_stroke(boxes[order[i % len(boxes)]], widths[i])) for i in range(n)])
    return np.concatenate([warp(canvases[i : i + batch], rng) for i in range(0, n, batch)])


# -- the corpus ------------------------------------------------------------------------------


def choose_classes(fonts: list[Font], min_families: int, max_classes: int) -> list[tuple[str, list[Font]]]:
    """Candidates with >= ``min_families`` families in the cmaps, in label order, and their fonts."""
    out = []
    for ch in candidates():
        have = [f for f in fonts if ch in f.chars]
        if len({f.family for f in have}) >= min_families:
            out.append((ch, have))
    return out[:max_classes] if max_classes > 0 else out


def fashion(data_dir: str, per_class: int, split: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` Fashion-MNIST images of each class (a seeded choice): [n, 32, 32] uint8, [n]."""
    from base_models.train_base import read_idx

    prefix = "train" if split == "train" else "t10k"
    d = Path(data_dir)
    images = read_idx(d / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(d / f"{prefix}-labels-idx1-ubyte.gz")
    rng = np.random.default_rng([seed, 10_000, 0 if split == "train" else 1])
    keep = np.concatenate(
        [np.sort(rng.permutation(np.flatnonzero(labels == c))[:per_class]) for c in range(10)]
    )
    return np.pad(images[keep], ((0, 0), (2, 2), (2, 2))), labels[keep].astype(np.int64)


def build(args: argparse.Namespace) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the warp's result must not depend on the thread count
    try:
        return _build(args)
    finally:
        torch.set_num_threads(threads)


def _build(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    if args.font_dir:
        files = sorted(p for p in Path(args.font_dir).rglob("*") if p.suffix.lower() in FONT_SUFFIXES)
    else:
        if args.install:
            ensure_packages(APT_FONTS + ([] if args.no_fashion else APT_DATA))
        files = package_fonts(APT_FONTS)
    fonts = [f for f in (read_font(p) for p in files) if f is not None and f.family not in SKIP_FAMILIES]
    if not fonts:
        raise SystemExit("no fonts found: install the packages in APT_FONTS or pass --font-dir")
    classes = choose_classes(fonts, args.min_families, args.max_classes)
    print(
        f"{len(fonts)} font files, {len({f.family for f in fonts})} families, {len(classes)} glyph classes",
        flush=True,
    )

    loaded: dict[Path, ImageFont.FreeTypeFont] = {}
    names, per_class_fonts = [], {}
    train_x, train_y, held_x, held_y = [], [], [], []
    for label, (ch, have) in enumerate(classes):
        boxes = []
        for f in have:
            if f.path not in loaded:
                loaded[f.path] = ImageFont.truetype(str(f.path), GLYPH_PX)
            box = glyph_box(loaded[f.path], ch)
            if box is not None:
                boxes.append(box)
        if not boxes:
            raise SystemExit(f"class {class_name(ch)}: every font's glyph is empty")
        names.append(class_name(ch))
        per_class_fonts[names[-1]] = len(boxes)
        train_x.append(render_class(boxes, args.per_class, args.seed, label, 0))
        held_x.append(render_class(boxes, args.heldout_per_class, args.seed, label, 1))
        train_y.append(np.full(args.per_class, label))
        held_y.append(np.full(args.heldout_per_class, label))
        if label % 20 == 0:
            print(f"  {label:3d} {names[-1]}: {len(boxes)} fonts", flush=True)

    flip_classes = []
    if not args.no_fashion:
        base = len(names)
        for split, xs, ys, n in (
            ("train", train_x, train_y, args.per_class),
            ("test", held_x, held_y, args.heldout_per_class),
        ):
            x, y = fashion(args.fashion_dir, n, split, args.seed)
            xs.append(x)
            ys.append(y + base)
        names += [f"fashion: {c}" for c in FASHION]
        flip_classes = list(range(base, base + 10))

    out.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train_images": np.concatenate(train_x).astype(np.uint8),
        "train_labels": np.concatenate(train_y).astype(np.int16),
        "heldout_images": np.concatenate(held_x).astype(np.uint8),
        "heldout_labels": np.concatenate(held_y).astype(np.int16),
    }
    digests = {}
    for key, arr in arrays.items():
        np.save(out / f"{key}.npy", arr, allow_pickle=False)
        digests[key] = hashlib.sha256((out / f"{key}.npy").read_bytes()).hexdigest()
    (out / "labels.json").write_text(json.dumps(names, indent=1, ensure_ascii=False) + "\n")
    info = {
        "classes": len(names),
        "glyph_classes": len(classes),
        "train": int(arrays["train_labels"].shape[0]),
        "heldout": int(arrays["heldout_labels"].shape[0]),
        "flip_classes": flip_classes,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "apt_fonts": APT_FONTS if not args.font_dir else [],
        "font_files": [str(f.path) for f in fonts],
        "families": sorted({f.family for f in fonts}),
        "skipped_families": SKIP_FAMILIES,
        "fonts_per_class": per_class_fonts,
        "excluded": EXCLUDED,
        "sha256": digests,
    }
    assert not any(is_digit_like(n[0]) for n in names[: len(classes)])
    (out / "corpus.json").write_text(json.dumps(info, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {out}: {info['train']} train, {info['heldout']} held-out, {len(names)} classes", flush=True)
    return info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "base_models" / "_corpus" / "broad"))
    p.add_argument("--per-class", type=int, default=600, help="train renders (and Fashion images) per class")
    p.add_argument("--heldout-per-class", type=int, default=50)
    p.add_argument(
        "--min-families", type=int, default=8, help="keep a class where >= this many families have it"
    )
    p.add_argument("--max-classes", type=int, default=0, help="keep only the first N glyph classes (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--font-dir", default="", help="use the fonts under this folder instead of APT_FONTS")
    p.add_argument("--no-install", dest="install", action="store_false", help="never call apt-get")
    p.add_argument("--fashion-dir", default=FMNIST_DIR)
    p.add_argument("--no-fashion", action="store_true")
    return p.parse_args(argv)


if __name__ == "__main__":
    build(parse_args())
