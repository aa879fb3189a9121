"""Byte-level language modelling on an offline corpus, split by document, measured in bits per byte."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from formers.data import get_source, load_documents
from formers.models.lm import check_sampling
from formers.registry import FormersError, _hint, register
from formers.tasks.base import Task

# Held-out documents per corpus: whole works, never seen in training.
HELD_OUT = {
    "shakespeare": ["macbeth", "twelfth_night"],
    "bible_kjv": ["Mat", "Rev"],
    "stdlib": ["difflib", "textwrap", "argparse"],
}


@register("task", "lm_bytes", paper="baseline")
class LMBytes(Task):
    """Next-byte prediction (vocab 256) on `corpus`; training windows of seq_len + 1 bytes at random offsets of the
    training documents; val = the held-out documents, scored as bits per byte = mean NLL / ln 2 over every byte."""

    metric = "val_bpb"
    mode = "min"

    def __init__(self, corpus: str = "shakespeare", seq_len: int = 256, held_out: list | None = None,
                 eval_batch_size: int = 16, eval_limit: int | None = 65536, sample_prompt: str = "\n",
                 sample_tokens: int = 300):
        self.corpus, self.seq_len = corpus, seq_len
        self.eval_batch_size, self.eval_limit = eval_batch_size, eval_limit
        self.sample_prompt, self.sample_tokens = sample_prompt, sample_tokens
        self.held_out = list(held_out if held_out is not None else HELD_OUT.get(corpus, []))
        get_source(corpus)  # unknown corpus: fail now, before anything loads
        self._data: tuple[torch.Tensor, torch.Tensor] | None = None

    def prepare(self) -> None:
        """Load the corpus and split it by document (once)."""
        if self._data is not None:
            return
        docs = load_documents(self.corpus)
        for name in self.held_out:
            if name not in docs:
                raise FormersError(f"task.held_out: no document '{name}' in corpus '{self.corpus}'"
                                   f"{_hint(name, docs)}")
        if not self.held_out:
            raise FormersError(f"task.held_out: give at least one document of '{self.corpus}' to hold out")
        as_tensor = lambda b: torch.from_numpy(np.frombuffer(b, dtype=np.uint8).copy()).long()  # noqa: E731
        train = as_tensor(b"\n".join(d for n, d in docs.items() if n not in self.held_out))
        val = as_tensor(b"\n".join(docs[n] for n in self.held_out))
        if len(train) <= self.seq_len + 1 or len(val) < 2:
            raise FormersError(f"corpus '{self.corpus}' is too short for seq_len={self.seq_len}")
        self._data = (train, val)

    @property
    def train_data(self) -> torch.Tensor:
        self.prepare()
        return self._data[0]

    @property
    def val_data(self) -> torch.Tensor:
        self.prepare()
        return self._data[1]

    def model_defaults(self):
        return {"vocab": 256, "max_len": self.seq_len}

    def train_size(self) -> int:
        return len(self.train_data) // self.seq_len

    def train_batch(self, batch_size, generator):
        starts = torch.randint(len(self.train_data) - self.seq_len - 1, (batch_size,), generator=generator)
        idx = starts[:, None] + torch.arange(self.seq_len + 1)  # (B, T + 1)
        w = self.train_data[idx]
        return {"x": w[:, :-1], "y": w[:, 1:]}

    def loss(self, model, batch):
        logits = model(batch["x"])  # (B, T, 256)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["y"].reshape(-1))

    @torch.no_grad()
    def evaluate(self, model, limit=None):
        """Bits per byte over the held-out bytes (the first `limit` when given), in non-overlapping windows."""
        was = model.training
        model.eval()
        data = self.val_data if limit is None else self.val_data[: limit + 1]
        n_pred = len(data) - 1
        T = self.seq_len
        starts = list(range(0, n_pred, T))
        nll = 0.0
        for i in range(0, len(starts), self.eval_batch_size):
            chunk = starts[i:i + self.eval_batch_size]
            full = [s for s in chunk if s + T <= n_pred]
            if full:
                idx = torch.tensor(full)[:, None] + torch.arange(T + 1)
                w = data[idx]
                logits = model(w[:, :-1])
                nll += F.cross_entropy(logits.reshape(-1, 256), w[:, 1:].reshape(-1), reduction="sum").item()
            for s in chunk:
                if s + T > n_pred:  # the ragged last window
                    w = data[s:][None]
                    logits = model(w[:, :-1])
                    nll += F.cross_entropy(logits.reshape(-1, 256), w[0, 1:], reduction="sum").item()
        model.train(was)
        return {"val_bpb": nll / n_pred / math.log(2), "val_bytes": n_pred}

    def sample(self, model, prompt: str | None = None, tokens: int | None = None, temperature: float = 0.8,
               top_k: int | None = None, seed: int = 0) -> str:
        prompt = self.sample_prompt if prompt is None else prompt
        return generate_text(model, prompt, tokens or self.sample_tokens, temperature=temperature, top_k=top_k,
                             seed=seed)


def generate_text(model, prompt: str, tokens: int, temperature: float = 0.8, top_k: int | None = None,
                  seed: int = 0) -> str:
    """Byte-level generation: encode the prompt as UTF-8 bytes, sample, decode (invalid bytes replaced).

    Models with absolute positions see at most `max_len` bytes: past that, generation slides its window,
    keeping the last max_len / 2 bytes as context for the next chunk."""
    if tokens < 0:
        raise FormersError(f"generate: the number of tokens must be >= 0, got {tokens}")
    check_sampling(temperature, top_k, None)
    out = torch.tensor(list(prompt.encode("utf-8")) or [10])[None]  # (1, N)
    absolute = getattr(getattr(model, "position", None), "kind", "") == "absolute"
    limit = getattr(model, "max_len", None) if absolute else None
    g = torch.Generator().manual_seed(seed)
    done = 0
    while done < tokens:
        ctx = out[:, -(limit // 2):] if limit and out.shape[1] > limit // 2 else out
        n = tokens - done if limit is None else min(tokens - done, limit - ctx.shape[1])
        new = model.generate(ctx, n, temperature=temperature, top_k=top_k, generator=g)[:, ctx.shape[1]:]
        out = torch.cat([out, new], dim=1)
        done += n
    return bytes(out[0].tolist()).decode("utf-8", errors="replace")
