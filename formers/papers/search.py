"""`formers papers search QUERY`: BM25 (the `bm25s` package) over each paper's title, abstract (papers.md),
mechanism note, equation and the names of its components; word pairs count as terms too (phrase matches)."""

from __future__ import annotations

import re

from formers.papers.catalog import Catalog, Paper
from formers.registry import FormersError


def _stem(words: list[str]) -> list[str]:
    """A light English stemmer (plurals and a few suffixes), enough to match 'heads' to 'head' and
    'normalization' to 'normalize' without an extra dependency."""
    out = []
    for w in words:
        for suf, rep in (("ization", "ize"), ("isation", "ize"), ("ies", "y"), ("sses", "ss"), ("ing", ""),
                         ("s", "")):
            if w.endswith(suf) and len(w) - len(suf) >= 3 and not (suf == "s" and w.endswith(("ss", "us", "is"))):
                w = w[: len(w) - len(suf)] + rep
                break
        out.append(w)
    return out


def _tokenize(texts: list[str]) -> list[list[str]]:
    import bm25s

    texts = [re.sub(r"[_\-/]", " ", t) for t in texts]  # sub_word tokens: 'squared_relu' -> 'squared relu'
    words = bm25s.tokenize(texts, stopwords="en", stemmer=_stem, return_ids=False, show_progress=False)
    # adjacent pairs as extra terms, so that a phrase ('linear attention') outranks its words scattered apart
    return [ws + [f"{a}_{b}" for a, b in zip(ws, ws[1:])] for ws in words]


class Index:
    """A BM25 index of the catalog; `search(query, k)` -> [(paper, score)] best first, zero scores left out."""

    def __init__(self, catalog: Catalog):
        try:
            import bm25s
        except ImportError as e:  # pragma: no cover - bm25s is in the dev extra
            raise FormersError("formers papers search needs the bm25s package: pip install bm25s") from e
        self.papers: list[Paper] = list(catalog)
        self.retriever = bm25s.BM25()
        self.retriever.index(_tokenize([p.search_text() for p in self.papers]), show_progress=False)

    def search(self, query: str, k: int = 10) -> list[tuple[Paper, float]]:
        tokens = _tokenize([query])
        if not tokens or not tokens[0]:
            raise FormersError(f"search: no searchable words in {query!r} (stop words only?)")
        k = max(1, min(k, len(self.papers)))
        docs, scores = self.retriever.retrieve(tokens, k=k, show_progress=False)
        return [(self.papers[int(i)], float(s)) for i, s in zip(docs[0], scores[0]) if s > 0]


def search(catalog: Catalog, query: str, k: int = 10) -> list[tuple[Paper, float]]:
    return Index(catalog).search(query, k)
