"""Text, Markdown and HTML views of the catalog: the `formers papers` table, `show`, docs/papers/PNN.md and the
self-contained web page of `formers papers html` (inline CSS/JS, plots as data: URIs, nothing fetched)."""

from __future__ import annotations

import base64
import html
import json
import textwrap
from pathlib import Path

from formers.papers.catalog import _SLOT, CATEGORIES, STATUSES, Catalog, Paper


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "~"


def _names(p: Paper, width: int) -> str:
    names = [c.name for c in p.components] + [a.split(":")[-1].strip() for a in p.api]
    if not names:
        return "-"
    out = ""
    for i, n in enumerate(names):
        more = f" +{len(names) - i}"
        cand = n if not out else f"{out}, {n}"
        if len(cand) + (len(more) if i < len(names) - 1 else 0) > width:
            return f"{out}{more}" if out else _clip(n, width)
        out = cand
    return out


def status_counts(counts: dict[str, int]) -> str:
    return "  ".join(f"{s} {counts[s]}" for s in STATUSES) + f"  (total {sum(counts.values())})"


# ---------------------------------------------------------------------------------------------------- text

def table(papers: list[Paper], counts: dict[str, int]) -> str:
    head = f"{'id':<4} {'short':<16} {'category':<18} {'components':<30} {'recipes':>7}  {'claim tests':<15} " \
           f"{'headline result':<34} status"
    lines = [head, "-" * len(head)]
    for p in papers:
        lines.append(f"{p.id:<4} {_clip(p.short, 16):<16} {_clip(p.category, 18):<18} {_names(p, 30):<30} "
                     f"{len(p.recipes) or '-':>7}  {_clip(p.tests.summary, 15):<15} {_clip(p.headline or '-', 34):<34} "
                     f"{p.status}")
    lines.append("-" * len(head))
    shown = f"{len(papers)} shown; " if len(papers) != sum(counts.values()) else ""
    lines.append(f"{shown}status: {status_counts(counts)}")
    return "\n".join(lines)


def _indent(text: str, n: int = 2) -> str:
    return textwrap.indent(text.strip("\n"), " " * n)


def _wrap(text: str, n: int = 2) -> str:
    return textwrap.fill(" ".join(str(text).split()), 116, initial_indent=" " * n, subsequent_indent=" " * n)


def show(p: Paper, catalog: Catalog) -> str:
    out = [f"{p.id}  {p.title}", f"short: {p.short}   category: {p.category}   status: {p.status}",
           _wrap("why: " + "; ".join(p.reasons), 0), ""]
    out.append("What formers implements:")
    if p.components or p.api:
        out += [f"  {c.family:<10} {c.name:<28} {_clip(c.doc, 80)}" for c in p.components]
        out += [f"  {'api':<10} {a}" for a in p.api]
    else:
        out.append("  nothing yet")
    if p.covers:
        out.append("Techniques this survey covers, in formers:")
        for c in p.covers:
            where = ", ".join(f"{x.family} {x.name} ({x.paper})" for x in c["components"])
            where = where or ", ".join(f"{q} [{catalog.get(q).status}]" for q in c["papers"]) or "not in formers"
            out.append(f"  {c['technique']}: {where}")
    out += ["", "Mechanism:", _wrap(p.get("mechanism", "")), "", "Equation:", _indent(p.get("equation", ""))]
    usage = p.usage()
    if usage:
        out += ["", "Usage:", _indent(usage, 4)]
    out += ["", "Recipes:"]
    out += [f"  formers train {r}" for r in p.recipes] or ["  none built in" + (
        f"; e.g. formers train lm_shakespeare {_override(p)}" if _override(p) else "")]
    out += ["", "Claim tests:"]
    if p.tests.files:
        for f in p.tests.files:
            mine = [c for c in p.tests.cases if c.file == f]
            n_pass = sum(c.outcome == "passed" for c in mine)
            bad = [c for c in mine if c.outcome in ("failed", "error")]
            state = "stale (edited since its last run)" if f in p.tests.stale else \
                ("not run" if not mine else f"{n_pass} passed" + (f", {len(bad)} FAILED" if bad else ""))
            out.append(f"  {f:<44} {state}")
        out.append(f"  run them: formers papers verify {p.id}")
    else:
        out.append("  none")
    out += ["", "Benchmark results:"]
    for r in p.results:
        line = f"  {r.file}: {r.spec.get('label', r.spec['key'])} = " + \
               (r.text() if r.value is not None else r.note)
        out.append(line)
        if r.target:
            out.append(_wrap(f"{r.target_text()} -- claim: {r.target.get('claim', '')}", 4))
    if not p.results:
        out.append("  none")
    out += ["", "Peers: " + (", ".join(p.get("peers", [])) or "none known"), "",
            "Not implemented:", _wrap(p.get("not_implemented", "")), "",
            "Out of reach offline:", _wrap(p.get("offline", ""))]
    return "\n".join(out)


def _override(p: Paper) -> str:
    """A recipe override that puts the paper's main component into the demo LM, where one applies."""
    c = p.main_component()
    slot = _SLOT.get(c.family) if c else None
    return f"model.{slot.path}={c.name}" if slot else ""


# ---------------------------------------------------------------------------------------------------- markdown

def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def paper_markdown(p: Paper, catalog: Catalog) -> str:
    L = [f"# {p.id} {p.short}", "", f"**{p.title}**", "",
         f"Category: {p.category} · Status: **{p.status}** ({'; '.join(p.reasons)})", "",
         "<!-- generated by `formers papers docs docs/papers` from formers/papers/papers.yaml; do not edit -->", "",
         "## Mechanism", "", " ".join(p.get("mechanism", "").split()), "", "```text", p.get("equation", "").strip(),
         "```", "", "## What formers implements", ""]
    if p.components or p.api:
        L += ["| family | name | what it is |", "|---|---|---|"]
        L += [f"| {c.family} | `{c.name}` | {_md_escape(c.doc)} |" for c in p.components]
        L += [f"| api | `{a}` | |" for a in p.api]
    else:
        L.append("Nothing yet.")
    if p.covers:
        L += ["", "Techniques this survey covers and where formers has them:", ""]
        for c in p.covers:
            where = ", ".join(f"`{x.family}/{x.name}` ([{x.paper}]({x.paper}.md))" if x.paper != "baseline"
                              else f"`{x.family}/{x.name}` (baseline)" for x in c["components"])
            where = where or ", ".join(f"[{q}]({q}.md) ({catalog.get(q).status})" for q in c["papers"]) \
                or "not in formers"
            L.append(f"- {c['technique']}: {where}")
    usage = p.usage()
    if usage:
        L += ["", "## Usage", "", "```python", usage.strip(), "```"]
    if p.recipes or _override(p):
        L += ["", "## Recipes", ""]
        L += [f"- `formers train {r}`" for r in p.recipes] or [f"- `formers train lm_shakespeare {_override(p)}`"]
    L += ["", "## Claim tests", ""]
    if p.tests.files:
        L += [f"- [`{f}`](../../{f})" for f in p.tests.files]
        L += ["", f"State: {p.tests.state} ({p.tests.summary}). Run them with `formers papers verify {p.id}`."]
    else:
        L.append("None.")
    L += ["", "## Benchmark results", ""]
    if p.results:
        L += ["| file | measurement | value | target |", "|---|---|---|---|"]
        for r in p.results:
            L.append(f"| [`{r.file}`](../../{r.file}) | {_md_escape(r.spec.get('label', r.spec['key']))} | "
                     f"{r.text() if r.value is not None else r.note} | "
                     f"{_md_escape(r.target_text() + ': ' + r.target.get('claim', '')) if r.target else ''} |")
        for png in sorted({_plot(r.spec["file"], catalog) for r in p.results} - {None}):
            L += ["", f"![{png.stem}](../../results/{png.relative_to(catalog.results_dir).as_posix()})"]
    else:
        L.append("None.")
    L += ["", "## Peers", "", ", ".join(p.get("peers", [])) or "None known.",
          "", "## Not implemented", "", " ".join(p.get("not_implemented", "").split()),
          "", "## Out of reach offline", "", " ".join(p.get("offline", "").split()),
          "", "## Abstract", "", "> " + " ".join(p.abstract.split()), "", "[All papers](README.md)", ""]
    return "\n".join(L)


def index_markdown(catalog: Catalog) -> str:
    L = ["# The 81 papers", "",
         "<!-- generated by `formers papers docs docs/papers`; do not edit -->", "",
         "Status is derived: **implemented** = components registered, **verified** = claim tests pass, "
         "**reproduced** = a committed benchmark result meets the paper's stated target, **planned** = none yet.", "",
         f"Counts: {status_counts(catalog.counts())}", "",
         "| id | paper | category | components | claim tests | headline result | status |",
         "|---|---|---|---|---|---|---|"]
    for p in catalog:
        comps = ", ".join(f"`{c.name}`" for c in p.components[:6]) + (" ..." if len(p.components) > 6 else "")
        L.append(f"| [{p.id}]({p.id}.md) | {_md_escape(p.title)} | {p.category} | {comps} | "
                 f"{p.tests.summary} | {_md_escape(p.headline or '-')} | {p.status} |")
    return "\n".join(L) + "\n"


def write_docs(catalog: Catalog, out: str | Path) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for p in catalog:
        path = out / f"{p.id}.md"
        path.write_text(paper_markdown(p, catalog), encoding="utf-8")
        written.append(path)
    (out / "README.md").write_text(index_markdown(catalog), encoding="utf-8")
    return [*written, out / "README.md"]


# ---------------------------------------------------------------------------------------------------- html

def _plot(spec_file: str, catalog: Catalog) -> Path | None:
    """The PNG written beside a result JSON: same stem, else the only PNG in that folder."""
    json_path = catalog.results_dir / spec_file
    png = json_path.with_suffix(".png")
    if png.exists():
        return png
    pngs = sorted(json_path.parent.glob("*.png")) if json_path.parent.is_dir() else []
    return pngs[0] if len(pngs) == 1 else None


_CSS = """
:root{--bg:#f6f7f9;--card:#fff;--ink:#1d2330;--mute:#5b6475;--line:#dfe3ea;--accent:#2a5bd7}
*{box-sizing:border-box} body{margin:0;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
background:var(--bg);color:var(--ink)} [hidden]{display:none !important}
header{position:sticky;top:0;z-index:2;background:#fff;border-bottom:1px solid var(--line);padding:12px 24px;
display:flex;flex-wrap:wrap;gap:12px;align-items:center} header h1{font-size:18px;margin:0 12px 0 0}
#q{flex:1 1 320px;padding:8px 10px;border:1px solid var(--line);border-radius:6px;font-size:15px}
#status{padding:7px;border:1px solid var(--line);border-radius:6px;font-size:15px} #count{color:var(--mute)}
.counts{color:var(--mute);font-size:13px;width:100%}
main{padding:8px 24px 40px} h2{font-size:16px;text-transform:uppercase;letter-spacing:.04em;color:var(--mute);
margin:24px 0 8px} .grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(420px,1fr));gap:14px}
.card{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:14px 16px;overflow:hidden}
.card h3{margin:0 0 4px;font-size:15px} .card .title{color:var(--mute);font-size:13px;margin:0 0 8px}
.pid{font-family:ui-monospace,monospace;color:var(--accent);margin-right:6px}
.badge{float:right;font-size:12px;padding:2px 8px;border-radius:10px;color:#fff}
.reproduced{background:#1b7f3b}.verified{background:#2a5bd7}.implemented{background:#b26b00}.planned{background:#8a8f98}
.comps code{background:#eef1f6;border-radius:4px;padding:1px 5px;margin:0 4px 4px 0;display:inline-block;font-size:12px}
pre{background:#0f1420;color:#e6e9ef;padding:10px;border-radius:6px;overflow:auto;font-size:12px;line-height:1.35}
.result{font-size:13px} .met{color:#1b7f3b} .notmet{color:#b3261e} img.plot{max-width:100%;margin-top:6px;
border:1px solid var(--line);border-radius:6px} .mute{color:var(--mute);font-size:13px} a{color:var(--accent)}
"""

_JS = """
(function(){
  var q=document.getElementById('q'), st=document.getElementById('status'), cards=document.querySelectorAll('.card');
  document.querySelectorAll('img[data-plot]').forEach(function(i){ i.src = PLOTS[i.getAttribute('data-plot')]; });
  function apply(){
    var words=q.value.toLowerCase().split(/\\s+/).filter(Boolean), s=st.value, n=0;
    cards.forEach(function(c){
      var ok=(!s || c.getAttribute('data-status')===s) &&
             words.every(function(w){ return c.getAttribute('data-text').indexOf(w)>=0; });
      c.hidden=!ok; if(ok) n++;
    });
    document.querySelectorAll('section.category').forEach(function(sec){
      sec.hidden = !sec.querySelector('.card:not([hidden])');
    });
    document.getElementById('count').textContent = n + ' of ' + cards.length + ' papers';
  }
  q.addEventListener('input', apply); st.addEventListener('change', apply); apply();
})();
"""


def _card(p: Paper, catalog: Catalog, plots: dict[str, str]) -> str:
    e = html.escape
    comps = "".join(f"<code>{e(c.family)}/{e(c.name)}</code>" for c in p.components)
    comps += "".join(f"<code>{e(a)}</code>" for a in p.api)
    parts = [f'<article class="card" id="{p.id}" data-status="{p.status}" data-category="{e(p.category)}" '
             f'data-text="{e(_card_text(p))}">',
             f'<span class="badge {p.status}">{p.status}</span>',
             f'<h3><span class="pid">{p.id}</span>{e(p.short)}</h3><p class="title">{e(p.title)}</p>',
             f'<div class="comps">{comps or "<span class=mute>no components yet</span>"}</div>',
             f'<p>{e(" ".join(p.get("mechanism", "").split()))}</p>']
    if p.covers:
        items = []
        for c in p.covers:
            links = ", ".join(f'<a href="#{x.paper}">{e(x.name)}</a>' if x.paper != "baseline" else e(x.name)
                              for x in c["components"])
            links = links or ", ".join(f'<a href="#{q}">{q}</a>' for q in c["papers"]) or "not in formers"
            items.append(f"<li>{e(c['technique'])}: {links}</li>")
        parts.append(f'<p class="mute">Covered techniques in formers:</p><ul class="mute">{"".join(items)}</ul>')
    usage = p.usage()
    if usage:
        parts.append(f"<pre><code>{e(usage.strip())}</code></pre>")
    parts.append(f'<p class="mute">Claim tests: {e(p.tests.summary)}'
                 + (f" · recipes: {e(', '.join(p.recipes))}" if p.recipes else "") + "</p>")
    for r in p.results:
        if r.value is None:
            continue
        verdict = "" if r.met is None else (' <span class="met">target met</span>' if r.met else
                                            ' <span class="notmet">target not met</span>')
        parts.append(f'<p class="result"><b>{e(r.text())}</b> — {e(r.spec.get("label", ""))}{verdict}</p>')
    for png in sorted({_plot(r.spec["file"], catalog) for r in p.results if r.value is not None} - {None}):
        key = "results/" + png.relative_to(catalog.results_dir).as_posix()
        if key not in plots:
            plots[key] = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()
        parts.append(f'<img class="plot" alt="{e(key)}" data-plot="{e(key)}">')
    parts.append("</article>")
    return "\n".join(parts)


def _card_text(p: Paper) -> str:
    words = [p.id, p.short, p.title, p.category, p.status, p.get("mechanism", ""), p.abstract,
             " ".join(f"{c.family} {c.name}" for c in p.components), " ".join(p.api)]
    return " ".join(" ".join(words).lower().split())


def html_page(catalog: Catalog) -> str:
    plots: dict[str, str] = {}
    sections = []
    for cat in CATEGORIES:
        papers = [p for p in catalog if p.category == cat]
        if papers:
            cards = "\n".join(_card(p, catalog, plots) for p in papers)
            sections.append(f'<section class="category" data-category="{cat}"><h2>{html.escape(cat)} '
                            f'({len(papers)})</h2><div class="grid">{cards}</div></section>')
    options = "".join(f'<option value="{s}">{s}</option>' for s in STATUSES)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>formers: the 81 papers</title><style>{_CSS}</style></head>
<body><header><h1>formers · 81 papers</h1>
<input id="q" type="search" placeholder="Filter: words in titles, abstracts, mechanisms, components" autocomplete="off">
<select id="status"><option value="">every status</option>{options}</select><span id="count"></span>
<div class="counts">{html.escape(status_counts(catalog.counts()))}. Status is derived from the registry, the claim
tests' last results and committed benchmark results.</div></header>
<main>{"".join(sections)}</main>
<script>var PLOTS = {json.dumps(plots)};</script>
<script>{_JS}</script></body></html>
"""


def write_html(catalog: Catalog, out: str | Path) -> Path:
    out = Path(out)
    if out.suffix.lower() in (".html", ".htm"):
        path = out
    else:
        out.mkdir(parents=True, exist_ok=True)
        path = out / "index.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html_page(catalog), encoding="utf-8")
    return path
