"""A small synthetic sequence-classification task that exercises the generic interface with no data files."""

from __future__ import annotations

import torch

from formers.registry import register
from formers.tasks.base import ClassificationTask


@register("task", "majority", paper="baseline")
class MajorityTask(ClassificationTask):
    """Which of `symbols` symbols occurs most often in a random sequence (ties: the smallest); seeded, deterministic.
    x (n, seq_len) over vocab `symbols`, y (n,) in [0, symbols)."""

    def __init__(self, seq_len: int = 32, symbols: int = 4, n_train: int = 4000, n_val: int = 500, seed: int = 0,
                 eval_batch_size: int = 128):
        super().__init__(eval_batch_size)
        self.seq_len, self.symbols, self.seed = seq_len, symbols, seed
        self.sizes = {"train": n_train, "val": n_val, "test": n_val}
        self.num_classes = self.vocab = symbols

    def load(self, split):
        g = torch.Generator().manual_seed(self.seed * 3 + ["train", "val", "test"].index(split))
        x = torch.randint(self.symbols, (self.sizes[split], self.seq_len), generator=g)
        counts = torch.nn.functional.one_hot(x, self.symbols).sum(1)  # (n, symbols)
        return x, counts.argmax(-1), None
