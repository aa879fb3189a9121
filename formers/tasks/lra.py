"""The five Long Range Arena tasks (Tay et al. 2021, P29), offline.

    lra_listops     ListOps expressions (the official generator's rules), 10 classes; S4-style tokens
    lra_pathfinder  32x32 Pathfinder images as 1,024 pixel tokens (vocab 256), 2 classes; easy/medium/hard
    lra_image       SUBSTITUTE for grey CIFAR-10 (not available offline): Fashion-MNIST as 784 pixel tokens
                    (vocab 256), no 2-D bias, 10 classes
    lra_text        SUBSTITUTE for byte-level IMDb: byte windows of the Linux kernel documentation (Debian
                    linux-doc-6.1) labelled by subsystem (the 8 largest English folders), split by document
    lra_retrieval   SUBSTITUTE for ACL Anthology pairs: pairs of kernel-doc windows, same subsystem or not, for
                    the paper's two-tower model (`dual_encoder`)

`mode: lite` (the default) fixes the sizes `formers bench lra --mode lite` runs on 2 cores: ListOps lengths in
(100, 500), text windows of 1,024 bytes, retrieval pairs of 2 x 1,024 bytes, 784 pixels, Pathfinder 32x32 at the
easiest level. `mode: full` uses the paper's: ListOps lengths in (500, 2000) padded to 2,000, 4,096-byte windows,
2 x 4,096 pairs, Pathfinder at the hard level (as S4-style loaders). Generated data is kept in the data cache
(`$FORMERS_DATA/lra/`, safetensors) and is a function of (task, options, seed) alone.

Every task is a ClassificationTask: batches {"x": ids, "y": labels, "mask": valid tokens} with 0 as padding where
lengths vary (ListOps, text); retrieval's x is (n, 2, N).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from formers.data import listops as lo
from formers.data import pathfinder as pf
from formers.data.sources import _atomic_write, cache_dir, debian_files, get_source, load_images
from formers.registry import FormersError, register
from formers.tasks.base import ClassificationTask

MODES = ("lite", "full")
SPLITS = ("train", "val", "test")
LINUX_DOC_PACKAGE = "linux-doc-6.1"
TEXT_CLASSES = 8
TEXT_EXCLUDE = ("translations",)  # the same documents in other languages


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise FormersError(f"task.mode: expected 'lite' or 'full', got {mode!r}")


def _sizes(n_train: int, n_val: int, n_test: int) -> dict[str, int]:
    for k, v in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if v < 1:
            raise FormersError(f"task.{k}: must be >= 1, got {v}")
    return {"train": n_train, "val": n_val, "test": n_test}


class _CachedTask(ClassificationTask):
    """Generated splits kept as safetensors under cache_dir()/lra/<key>.safetensors (atomic writes).

    Shared options: `mode` (lite | full), `seed`, `eval_batch_size`, `eval_limit`; tasks with generated splits give
    SIZES = {mode: (train, val, test)} defaults, which n_train / n_val / n_test override."""

    name = "lra"
    SIZES: dict[str, tuple[int, int, int]] = {}

    def __init__(self, mode: str, seed: int, eval_batch_size: int, eval_limit: int | None,
                 n_train: int | None = None, n_val: int | None = None, n_test: int | None = None):
        _check_mode(mode)
        super().__init__(eval_batch_size)
        self.mode, self.seed, self.eval_limit = mode, seed, eval_limit
        if self.SIZES:
            d = self.SIZES[mode]
            self.sizes = _sizes(n_train or d[0], n_val or d[1], n_test or d[2])

    def key(self) -> dict[str, Any]:
        raise NotImplementedError

    def build(self) -> dict[str, torch.Tensor]:
        """{f'{split}_x', f'{split}_y'[, f'{split}_mask']} for every split."""
        raise NotImplementedError

    def cache_file(self) -> Path:
        digest = hashlib.sha1(json.dumps(self.key(), sort_keys=True).encode()).hexdigest()[:12]
        return cache_dir() / "lra" / f"{self.name}-{digest}.safetensors"

    def arrays(self) -> dict[str, torch.Tensor]:
        if getattr(self, "_arrays", None) is None:
            from safetensors.torch import load_file, save

            f = self.cache_file()
            if f.exists():
                self._arrays = load_file(str(f))
            else:
                self._arrays = {k: v.contiguous() for k, v in self.build().items()}
                _atomic_write(f, save(self._arrays, metadata={"key": json.dumps(self.key(), sort_keys=True)}))
        return self._arrays

    def prepare(self) -> None:
        self.arrays()

    def load(self, split):
        """Inputs stay in their compact stored dtype (uint8 / int16: full-mode ListOps is 96k x 2,000 tokens);
        batches are widened to int64 in `_batch`."""
        a = self.arrays()
        mask = a.get(f"{split}_mask")
        return a[f"{split}_x"], a[f"{split}_y"].long(), None if mask is None else mask.bool()

    def _batch(self, split, idx):
        batch = super()._batch(split, idx)
        batch["x"] = batch["x"].long()
        return batch

    def majority(self, split: str = "test", limit: int | None = None) -> float:
        """Accuracy of always predicting the most frequent training label (on the first `limit` of `split`)."""
        y_train, y = self.split("train")[1], self.split(split)[1][:limit]
        top = int(torch.bincount(y_train).argmax())
        return float((y == top).float().mean())


# ------------------------------------------------------------------------------------------------------ ListOps

@register("task", "lra_listops", paper="P29")
class ListOpsTask(_CachedTask):
    """ListOps with the official generator rules (formers/data/listops.py); 10 classes; x (n, max_len) token ids
    (15 symbols, 0 = padding), mask = real tokens. lite: lengths in (100, 500), 20k/500/1k; full: (500, 2000),
    96k/2k/2k as the released data."""

    name = "listops"
    num_classes = 10
    vocab = lo.VOCAB
    SIZES = {"lite": (20000, 500, 1000), "full": (96000, 2000, 2000)}

    def __init__(self, mode: str = "lite", min_len: int | None = None, max_len: int | None = None,
                 n_train: int | None = None, n_val: int | None = None, n_test: int | None = None, seed: int = 0,
                 eval_batch_size: int = 50, eval_limit: int | None = None):
        super().__init__(mode, seed, eval_batch_size, eval_limit, n_train, n_val, n_test)
        lite = mode == "lite"
        self.min_len = (100 if lite else 500) if min_len is None else min_len
        self.max_len = (500 if lite else 2000) if max_len is None else max_len
        if not 1 <= self.min_len < self.max_len - 1:
            raise FormersError(f"task.min_len/max_len: need 1 <= min_len < max_len - 1, got {self.min_len}, "
                               f"{self.max_len}")

    def key(self):
        return {"task": "listops", "v": 1, "min": self.min_len, "max": self.max_len, "sizes": self.sizes,
                "seed": self.seed}

    def build(self):
        seen: set = set()
        out = {}
        for i, split in enumerate(SPLITS):
            ex = lo.generate(self.sizes[split], self.min_len, self.max_len, seed=self.seed * 7 + i, seen=seen)
            x = torch.tensor([lo.encode(t, self.max_len) for t, _ in ex], dtype=torch.uint8)
            out[f"{split}_x"], out[f"{split}_y"] = x, torch.tensor([y for _, y in ex], dtype=torch.uint8)
            out[f"{split}_mask"] = x != 0
        return out


# --------------------------------------------------------------------------------------------------- Pathfinder

@register("task", "lra_pathfinder", paper="P29")
class PathfinderTask(_CachedTask):
    """Pathfinder images (formers/data/pathfinder.py) flattened row by row to size^2 pixel tokens (vocab 256);
    2 balanced classes. lite: 32x32, level easy, 10k/500/1k; full: 32x32, level hard, 160k/20k/20k (LRA's 80/10/10
    of 200k)."""

    name = "pathfinder"
    num_classes = 2
    vocab = 256
    SIZES = {"lite": (10000, 500, 1000), "full": (160000, 20000, 20000)}

    def __init__(self, mode: str = "lite", level: str | None = None, size: int = 32, n_train: int | None = None,
                 n_val: int | None = None, n_test: int | None = None, seed: int = 0, eval_batch_size: int = 50,
                 eval_limit: int | None = None):
        super().__init__(mode, seed, eval_batch_size, eval_limit, n_train, n_val, n_test)
        self.level = ("easy" if mode == "lite" else "hard") if level is None else level
        if self.level not in pf.LEVELS:
            raise FormersError(f"task.level: expected one of {', '.join(pf.LEVELS)}, got {self.level!r}")
        if size < 16:
            raise FormersError(f"task.size: Pathfinder needs at least 16x16 pixels, got {size}")
        self.size = size

    def key(self):
        return {"task": "pathfinder", "v": 1, "level": self.level, "size": self.size, "sizes": self.sizes,
                "seed": self.seed}

    def build(self):
        out = {}
        for i, split in enumerate(SPLITS):
            images, labels = pf.generate(self.sizes[split], self.level, self.size, seed=[self.seed, i],
                                         desc=f"pathfinder {split}")
            out[f"{split}_x"] = torch.from_numpy(images.reshape(len(images), -1))
            out[f"{split}_y"] = torch.from_numpy(labels.astype(np.uint8))
        return out


# -------------------------------------------------------------------------------------------------------- Image

@register("task", "lra_image", paper="P29")
class ImageTask(_CachedTask):
    """SUBSTITUTE for LRA's grey CIFAR-10 (not available offline): Fashion-MNIST as 784 pixel tokens (vocab 256,
    row-major, no 2-D bias); 10 classes; train = the official 60k minus 5k held out as val (seeded), test = the
    official 10k. val_size: lite 1,000, full 5,000. Needs `formers data fetch fashion_mnist`."""

    name = "image"
    num_classes = 10
    vocab = 256

    def __init__(self, mode: str = "lite", val_size: int | None = None, seed: int = 0, eval_batch_size: int = 50,
                 eval_limit: int | None = None):
        super().__init__(mode, seed, eval_batch_size, eval_limit)
        get_source("fashion_mnist")
        val_size = (1000 if mode == "lite" else 5000) if val_size is None else val_size
        if val_size < 1:
            raise FormersError(f"task.val_size: must be >= 1, got {val_size}")
        self.val_size = val_size

    def arrays(self):  # nothing generated: read the image source directly
        if getattr(self, "_arrays", None) is None:
            a = load_images("fashion_mnist")
            x, y = a["train_images"].reshape(len(a["train_images"]), -1), a["train_labels"]
            perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
            val, train = perm[: self.val_size].sort().values, perm[self.val_size:].sort().values
            self._arrays = {"train_x": x[train], "train_y": y[train], "val_x": x[val], "val_y": y[val],
                            "test_x": a["test_images"].reshape(len(a["test_images"]), -1),
                            "test_y": a["test_labels"]}
        return self._arrays


# ----------------------------------------------------------------------------------------------- Text, Retrieval

def kernel_docs() -> dict[str, dict[str, bytes]]:
    """{subsystem: {relative path: text}} of the English kernel documentation in Debian linux-doc-6.1, for the
    TEXT_CLASSES subsystems (top-level folders of Documentation/) with the most bytes."""
    files = [p for p in debian_files(LINUX_DOC_PACKAGE) if p.name.endswith(".rst.gz")]
    if not files:
        raise FormersError(f"the LRA text and retrieval tasks read the Linux kernel documentation: "
                           f"apt-get install {LINUX_DOC_PACKAGE}")
    by_sub: dict[str, dict[str, bytes]] = {}
    for p in sorted(files):
        rel = str(p).split("/Documentation/", 1)[-1]
        if "/" not in rel or rel.split("/")[0] in TEXT_EXCLUDE:
            continue
        with gzip.open(p, "rb") as f:
            by_sub.setdefault(rel.split("/")[0], {})[rel] = f.read()
    top = sorted(by_sub, key=lambda s: -sum(map(len, by_sub[s].values())))[:TEXT_CLASSES]
    return {s: by_sub[s] for s in sorted(top)}


def doc_split(rel: str) -> str:
    """Split of a document by a hash of its path: 80% train, 10% val, 10% test (fixed, independent of seeds)."""
    h = int(hashlib.sha1(rel.encode()).hexdigest(), 16) % 10
    return "test" if h == 0 else "val" if h == 1 else "train"


def windows(text: bytes, size: int, min_fill: float = 0.25) -> list[bytes]:
    """Consecutive non-overlapping windows of `size` bytes; a last partial window is kept when it holds at least
    min_fill * size bytes."""
    out = [text[i:i + size] for i in range(0, len(text), size)]
    return [w for w in out if len(w) >= min_fill * size]


def _window(mode: str, window: int | None) -> int:
    """Byte window of the text tasks: lite 1,024, full 4,096, or the user's (>= 16)."""
    w = (1024 if mode == "lite" else 4096) if window is None else window
    if w < 16:
        raise FormersError(f"task.window: must be >= 16 bytes, got {w}")
    return w


def encode_bytes(chunks: list[bytes], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Byte ids + 1 (0 = padding) (n, size) uint8-safe int16 and the mask of real bytes."""
    x = torch.zeros(len(chunks), size, dtype=torch.int16)
    for i, c in enumerate(chunks):
        x[i, : len(c)] = torch.from_numpy(np.frombuffer(c, dtype=np.uint8).astype(np.int16)) + 1
    return x, x != 0


@register("task", "lra_text", paper="P29")
class TextTask(_CachedTask):
    """SUBSTITUTE for LRA's byte-level IMDb: byte windows (lite 1,024, full 4,096) of the English Linux kernel
    documentation labelled by subsystem (8 classes: the largest top-level folders), documents split 80/10/10 by a
    hash of their path, so no document crosses splits. Vocab 257 (byte + 1; 0 = padding)."""

    name = "text"
    num_classes = TEXT_CLASSES
    vocab = 257

    def __init__(self, mode: str = "lite", window: int | None = None, seed: int = 0, eval_batch_size: int = 50,
                 eval_limit: int | None = None, max_val: int = 500, max_test: int = 1000):
        super().__init__(mode, seed, eval_batch_size, eval_limit)
        self.window = _window(mode, window)
        self.max_split = {"val": max_val, "test": max_test}

    def key(self):
        return {"task": "text", "v": 1, "window": self.window, "seed": self.seed, "max": self.max_split}

    def build(self):
        docs = kernel_docs()
        classes = list(docs)
        chunks: dict[str, list[tuple[bytes, int]]] = {s: [] for s in SPLITS}
        for c, sub in enumerate(classes):
            for rel, text in docs[sub].items():
                chunks[doc_split(rel)].extend((w, c) for w in windows(text, self.window))
        rng = random.Random(self.seed)
        out = {}
        for split in SPLITS:
            items = chunks[split]
            rng.shuffle(items)
            if split in self.max_split:
                items = items[: self.max_split[split]]
            x, mask = encode_bytes([w for w, _ in items], self.window)
            out[f"{split}_x"], out[f"{split}_mask"] = x, mask
            out[f"{split}_y"] = torch.tensor([c for _, c in items], dtype=torch.uint8)
        return out


@register("task", "lra_retrieval", paper="P29")
class RetrievalTask(_CachedTask):
    """SUBSTITUTE for LRA's ACL Anthology retrieval: is a pair of kernel-doc windows (each lite 1,024, full 4,096
    bytes, from two different documents of the same split) from the same subsystem? Balanced classes; x (n, 2, N),
    mask (n, 2, N); use the two-tower `dual_encoder` model. lite 10k/500/1k pairs, full 40k/2k/2k."""

    name = "retrieval"
    num_classes = 2
    vocab = 257
    SIZES = {"lite": (10000, 500, 1000), "full": (40000, 2000, 2000)}

    def __init__(self, mode: str = "lite", window: int | None = None, n_train: int | None = None,
                 n_val: int | None = None, n_test: int | None = None, seed: int = 0, eval_batch_size: int = 32,
                 eval_limit: int | None = None):
        super().__init__(mode, seed, eval_batch_size, eval_limit, n_train, n_val, n_test)
        self.window = _window(mode, window)

    def model_defaults(self):
        return {"vocab": self.vocab, "num_classes": self.num_classes, "max_len": self.window}

    def key(self):
        return {"task": "retrieval", "v": 1, "window": self.window, "sizes": self.sizes, "seed": self.seed}

    def build(self):
        docs = kernel_docs()
        pools: dict[str, list[list[tuple[str, bytes]]]] = {s: [[] for _ in docs] for s in SPLITS}
        for c, sub in enumerate(docs):
            for rel, text in docs[sub].items():
                pools[doc_split(rel)][c].extend((rel, w) for w in windows(text, self.window))
        rng = random.Random(self.seed)
        out = {}
        for split in SPLITS:
            pool = [p for p in pools[split] if p]
            if len(pool) < 2:
                raise FormersError(f"lra_retrieval: the {split} split has fewer than two subsystems")
            first, second, labels = [], [], []
            while len(labels) < self.sizes[split]:
                label = len(labels) % 2
                a = rng.randrange(len(pool))
                b = a if label else rng.choice([i for i in range(len(pool)) if i != a])
                (ra, wa), (rb, wb) = rng.choice(pool[a]), rng.choice(pool[b])
                if ra == rb:  # two windows of one document would make the task trivial
                    continue
                first.append(wa)
                second.append(wb)
                labels.append(label)
            x1, m1 = encode_bytes(first, self.window)
            x2, m2 = encode_bytes(second, self.window)
            out[f"{split}_x"], out[f"{split}_mask"] = torch.stack([x1, x2], 1), torch.stack([m1, m2], 1)
            out[f"{split}_y"] = torch.tensor(labels, dtype=torch.uint8)
        return out


TASKS = {"listops": "lra_listops", "text": "lra_text", "retrieval": "lra_retrieval", "image": "lra_image",
         "pathfinder": "lra_pathfinder"}
SUBSTITUTED = {"text": "Linux kernel docs by subsystem (for IMDb)",
               "retrieval": "kernel-doc pairs, same subsystem (for ACL Anthology)",
               "image": "Fashion-MNIST 784 pixels (for grey CIFAR-10)"}

__all__ = ["ListOpsTask", "PathfinderTask", "ImageTask", "TextTask", "RetrievalTask", "TASKS", "SUBSTITUTED",
           "kernel_docs", "doc_split", "windows"]
