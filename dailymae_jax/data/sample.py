"""A small, deterministic ImageFolder cut from real photographs shipped inside installed wheels.

The project needs a dataset that exists on every machine without downloads (CI, smoke tests,
tutorials). scikit-image, scikit-learn and matplotlib ship a handful of real photographs; each
photograph becomes one class and every sample is a random crop of it, rescaled to ImageNet-like
geometry (longest side 500 px, mixed landscape/portrait aspect ratios) and saved as JPEG.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from dailymae_jax import files

# Bump when the generation procedure changes, so stale datasets on disk are rebuilt.
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
LONGEST_SIDE = 500
JPEG_QUALITY = 90
# Fraction of the source photograph's area a crop covers (as in RandomResizedCrop).
CROP_SCALE = (0.25, 1.0)
# Width/height ratios common in ImageNet (500x375, 500x333, square, and their portrait versions).
ASPECT_RATIOS = (4 / 3, 3 / 2, 1.0, 5 / 4, 3 / 4, 2 / 3, 4 / 5)
ASPECT_WEIGHTS = (0.35, 0.15, 0.1, 0.05, 0.2, 0.1, 0.05)

# class name -> (package that ships the file, path relative to the package directory).
# Only real photographs: synthetic images (chessboard, logo, phantom, text, color wheel, blobs)
# and silhouettes (horse) are left out. camera/coins/moon are grayscale photos, stored as RGB.
SOURCE_PHOTOGRAPHS: dict[str, tuple[str, str]] = {
    "astronaut": ("skimage", "data/astronaut.png"),
    "chelsea": ("skimage", "data/chelsea.png"),
    "coffee": ("skimage", "data/coffee.png"),
    "hubble": ("skimage", "data/hubble_deep_field.jpg"),
    "ihc": ("skimage", "data/ihc.png"),
    "motorcycle": ("skimage", "data/motorcycle_left.png"),
    "retina": ("skimage", "data/retina.jpg"),
    "rocket": ("skimage", "data/rocket.jpg"),
    "camera": ("skimage", "data/camera.png"),
    "coins": ("skimage", "data/coins.png"),
    "moon": ("skimage", "data/moon.png"),
    "china": ("sklearn", "datasets/images/china.jpg"),
    "flower": ("sklearn", "datasets/images/flower.jpg"),
    "grace_hopper": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
}


def source_photograph_paths() -> dict[str, Path]:
    """Return class name -> absolute path of each source photograph, sorted by class name.

    Raises FileNotFoundError naming the package if one is not installed or lacks the file.
    """
    paths: dict[str, Path] = {}
    for name in sorted(SOURCE_PHOTOGRAPHS):
        package, rel = SOURCE_PHOTOGRAPHS[name]
        # find_spec locates the package without importing it (sklearn/matplotlib imports are slow).
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"package {package!r} (source of {name!r}) is not installed")
        path = Path(list(spec.submodule_search_locations)[0]) / rel
        if not path.is_file():
            raise FileNotFoundError(f"photograph {rel!r} not found in package {package!r}: {path}")
        paths[name] = path
    return paths


def _load_sources() -> dict[str, Image.Image]:
    """Decode every source photograph once, as RGB."""
    images = {}
    for name, path in source_photograph_paths().items():
        with Image.open(path) as im:
            images[name] = im.convert("RGB")
    return images


def _sample_geometry(rng: np.random.Generator, src_w: int, src_h: int) -> tuple[tuple[float, ...], tuple[int, int], bool]:
    """Draw one crop box, output size and flip.

    The crop has exactly the output aspect ratio, so resizing never distorts the photograph.
    If the drawn area does not fit the source at that aspect, the crop shrinks until it does
    (instead of retrying), which keeps the number of RNG draws per image fixed.
    """
    aspect = float(rng.choice(ASPECT_RATIOS, p=ASPECT_WEIGHTS))
    area = rng.uniform(*CROP_SCALE) * src_w * src_h
    crop_w = np.sqrt(area * aspect)
    crop_h = crop_w / aspect
    shrink = min(1.0, src_w / crop_w, src_h / crop_h)
    crop_w, crop_h = crop_w * shrink, crop_h * shrink
    # max(0, ...): after the shrink the crop can exceed the source by a rounding error.
    left = rng.uniform(0.0, max(0.0, src_w - crop_w))
    top = rng.uniform(0.0, max(0.0, src_h - crop_h))
    flip = bool(rng.random() < 0.5)
    if aspect >= 1.0:
        size = (LONGEST_SIDE, round(LONGEST_SIDE / aspect))
    else:
        size = (round(LONGEST_SIDE * aspect), LONGEST_SIDE)
    return (left, top, left + crop_w, top + crop_h), size, flip


def _render(source: Image.Image, box: tuple[float, ...], size: tuple[int, int], flip: bool) -> bytes:
    """Crop, resize (in one resampling pass via ``box``), flip and JPEG-encode one sample."""
    out = source.resize(size, Image.Resampling.BICUBIC, box=box)
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling="4:2:0")
    return buf.getvalue()


def _split_sizes(n: int, val_fraction: float) -> tuple[int, int]:
    """Split n images of one class into (train, val), with at least one in each."""
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    return n - n_val, n_val


def _read_manifest(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None


def make_sample_dataset(out_dir: str | Path, num_images: int = 600, seed: int = 0,
                        val_fraction: float = 0.2) -> dict:
    """Build (or reuse) the sample ImageFolder at ``out_dir`` and return its summary.

    Layout: ``out_dir/{train,val}/<class>/<class>_<index>.jpg`` plus ``out_dir/manifest.json``.
    Classes are balanced (round-robin over the source photographs) and every class has at least
    one image in each split. The same (num_images, seed, val_fraction) gives byte-identical files.
    If ``out_dir`` already holds a complete dataset with these parameters it is returned as is.
    The dataset is built in a sibling temporary folder and renamed into place, so an interrupted
    run never leaves a half-written folder that looks complete.
    """
    out_dir = Path(out_dir)
    names = sorted(SOURCE_PHOTOGRAPHS)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if num_images < 2 * len(names):
        raise ValueError(f"num_images must be at least {2 * len(names)} "
                         f"(one train and one val image for each of {len(names)} classes), got {num_images}")
    params = {"format_version": FORMAT_VERSION, "num_images": int(num_images), "seed": int(seed),
              "val_fraction": float(val_fraction)}

    existing = _read_manifest(out_dir)
    if existing is not None and existing.get("params") == params:
        return {**existing["summary"], "root": str(out_dir)}
    if out_dir.exists() and existing is None and any(out_dir.iterdir()):
        # Never delete a folder we did not create.
        raise ValueError(f"{out_dir} exists, is not empty and is not a sample dataset; refusing to overwrite")

    rng = np.random.default_rng(seed)
    sources = _load_sources()
    per_class_total = {name: 0 for name in names}
    for i in range(num_images):
        per_class_total[names[i % len(names)]] += 1
    per_split: dict[str, dict[str, int]] = {"train": {}, "val": {}}
    for name in names:
        per_split["train"][name], per_split["val"][name] = _split_sizes(per_class_total[name], val_fraction)

    # Created exclusively under an unpredictable name: no existing directory or link can stand in for it.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tmp_dir.chmod(0o777 & ~files.umask())
        for split in per_split:
            for name in names:
                (tmp_dir / split / name).mkdir(parents=True)
        seen = {name: 0 for name in names}
        for i in range(num_images):
            name = names[i % len(names)]
            index = seen[name]
            seen[name] += 1
            src = sources[name]
            box, size, flip = _sample_geometry(rng, src.width, src.height)
            # The last images of each class go to val; samples are i.i.d., so which ones is arbitrary.
            split = "train" if index < per_split["train"][name] else "val"
            (tmp_dir / split / name / f"{name}_{index:05d}.jpg").write_bytes(_render(src, box, size, flip))

        summary = {
            "classes": names,
            "num_images": int(num_images),
            "seed": int(seed),
            "val_fraction": float(val_fraction),
            "counts": {split: sum(c.values()) for split, c in per_split.items()},
            "per_class": per_split,
        }
        # The manifest is the completeness marker; it is written last, before the rename.
        (tmp_dir / MANIFEST_NAME).write_text(json.dumps({"params": params, "summary": summary}, indent=2))
        if out_dir.exists():
            # Either an empty folder or our own dataset built with other parameters.
            shutil.rmtree(out_dir)
        os.replace(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return {**summary, "root": str(out_dir)}
