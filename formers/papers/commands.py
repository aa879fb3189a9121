"""`formers papers [list|show|verify|search|html|docs]`: the command-line side of the catalog (formers/cli.py adds
the parser through `add_parser` and calls `main`)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from formers.papers.catalog import CATEGORIES, STATUSES, Catalog, Paper, read_junit
from formers.registry import FormersError


def add_parser(sub) -> None:
    p = sub.add_parser("papers", help="the 81 papers: table, show, verify claim tests, search, web page, docs")
    p.set_defaults(fn=main)
    acts = p.add_subparsers(dest="action")
    ls = acts.add_parser("list", help="table of all papers with derived status (the default)")
    # on both, so that `papers --status planned` and `papers list --status planned` work; the list copy has no
    # default of its own, else an absent `list --status` would overwrite `papers --status planned list`
    for q, default in ((p, None), (ls, argparse.SUPPRESS)):
        q.add_argument("--category", default=default, help=f"one of: {', '.join(CATEGORIES)}")
        q.add_argument("--status", default=default, choices=STATUSES)
    s = acts.add_parser("show", help="one paper: components, equation, usage, claim tests, results")
    s.add_argument("paper", help="P06, 6 or a short name such as SLAB")
    v = acts.add_parser("verify", help="run a paper's claim tests now (pytest) and print pass/fail per test")
    v.add_argument("papers", nargs="*", help="paper ids (P06 ...)")
    v.add_argument("--all", action="store_true", help="every paper's claim tests")
    f = acts.add_parser("search", help="BM25 over titles, abstracts and mechanism notes")
    f.add_argument("query", nargs="+")
    f.add_argument("-k", type=int, default=10, help="how many papers (default 10)")
    h = acts.add_parser("html", help="write a self-contained web page (OUT/index.html)")
    h.add_argument("out", help="folder (or a .html file)")
    d = acts.add_parser("docs", help="write docs/papers/PNN.md and an index README.md")
    d.add_argument("out", nargs="?", default="docs/papers")


def main(a: argparse.Namespace) -> int:
    from formers.papers import render

    action = a.action or "list"  # `formers papers` alone lists
    cat = Catalog()
    if action == "verify":
        return verify(cat, a.papers, everything=a.all)
    if action == "list":
        print(render.table(cat.select(a.category, a.status), cat.counts()))
    elif action == "show":
        print(render.show(cat.get(a.paper), cat))
    elif action == "search":
        from formers.papers.search import search

        query = " ".join(a.query)
        hits = search(cat, query, a.k)
        if not hits:
            print(f"no paper matches {query!r}")
            return 1
        for rank, (p, score) in enumerate(hits, 1):
            names = ", ".join(f"{c.family}/{c.name}" for c in p.components) or "no components yet"
            print(f"{rank:>2}. {p.id} {p.short:<22} {score:6.2f}  [{p.status}] {render._clip(p.title, 70)}")
            print(f"      {render._clip(names, 110)}")
    elif action == "html":
        path = render.write_html(cat, a.out)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, self-contained: open it in a browser, offline)")
    elif action == "docs":
        paths = render.write_docs(cat, a.out)
        print(f"wrote {len(paths)} files to {a.out}")
    return 0


def verify(cat: Catalog, ids: list[str], everything: bool = False, out=print,
           junit_dir: str | Path | None = None) -> int:
    """Run the claim tests of the given papers (or all) with pytest in a subprocess; print pass/fail per test;
    the junit file goes to .junit/ (or `junit_dir`) so that `formers papers` shows the result afterwards."""
    if not cat.has_tests:
        raise FormersError(f"no tests/papers folder under {cat.root}: verify needs a source checkout of formers "
                           "(pip install -e .)")
    if everything == bool(ids):
        raise FormersError("formers papers verify: name the papers (e.g. P06 P54) or pass --all, one of the two")
    papers: list[Paper] = list(cat) if everything else [cat.get(i) for i in ids]
    without = [] if everything else [p.id for p in papers if not p.tests.files]  # named, but nothing to run
    papers = [p for p in papers if p.tests.files]
    have = ", ".join(p.id for p in cat if p.tests.files) or "none"
    if not papers and everything:
        raise FormersError(f"no paper has claim tests (tests/papers/test_pNN_*.py under {cat.root})")
    if not papers:
        raise FormersError(f"no claim tests for {', '.join(without)}; papers that have them: {have}")
    if without:
        out(f"no claim tests for {', '.join(without)} (papers that have them: {have}); running the others")
    files = sorted({f for p in papers for f in p.tests.files})
    junit_dir = Path(junit_dir) if junit_dir else cat.root / ".junit"
    junit_dir.mkdir(parents=True, exist_ok=True)
    tag = "all" if everything else "-".join(p.id for p in papers[:4]) + ("-more" if len(papers) > 4 else "")
    junit = junit_dir / f"verify-{tag}.xml"
    out(f"running {len(files)} claim-test file(s) of {len(papers)} paper(s) with pytest ...")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *files]
    proc = subprocess.run(cmd, cwd=cat.root, capture_output=True, text=True)
    cases = read_junit([junit]) if junit.exists() else {}
    if proc.returncode not in (0, 1) or not cases:
        out((proc.stdout + proc.stderr)[-4000:])
        raise FormersError(f"pytest could not run the claim tests (exit status {proc.returncode}); see above")
    n_pass = n_fail = 0
    for p in papers:
        out(f"\n{p.id} {p.title}")
        for f in p.tests.files:
            for c in sorted(cases.get(f, []), key=lambda c: c.nodeid):
                word = {"passed": "pass", "failed": "FAIL", "error": "ERROR", "skipped": "skip"}[c.outcome]
                out(f"  {word:<5} {c.nodeid}  ({c.seconds:.2f} s)")
                if c.outcome in ("failed", "error"):
                    out(f"        {c.message[:200]}")
                n_pass += c.outcome == "passed"
                n_fail += c.outcome in ("failed", "error")
    where = junit.relative_to(cat.root) if junit.is_relative_to(cat.root) else junit
    out(f"\n{n_pass} passed, {n_fail} failed; results in {where} (`formers papers` reads .junit/*.xml)")
    return 0 if n_fail == 0 and proc.returncode == 0 else 1
