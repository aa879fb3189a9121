"""The paper catalog (issue 11, DESIGN 7): 81 entries consistent with papers.md and the registry, status derived
from junit results and benchmark targets, BM25 search, and the static page driven in headless Chromium."""

import json
import os
import re
import time
from pathlib import Path

import pytest

import formers
from formers.cli import main, make_parser
from formers.config import builtin_recipes
from formers.papers import STATUSES, Catalog
from formers.papers.catalog import CATEGORIES, ID_RE, load_data, read_abstracts, resolve_api
from formers.papers.commands import verify
from formers.papers.render import write_docs, write_html
from formers.papers.search import Index

ROOT = Path(__file__).resolve().parents[1]
SHARED_PAPERS = ROOT.parent / "shared" / "papers" / "papers.md"
CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def cat():
    return Catalog()


def test_every_registered_component_names_a_paper_or_baseline():
    bad = [f"{e.family}/{e.name}: {e.paper!r}" for e in formers.entries()
           if e.paper != "baseline" and not ID_RE.fullmatch(e.paper)]
    assert not bad, f"components whose paper is neither P01..P81 nor 'baseline': {bad}"


def test_exactly_81_entries_whose_titles_match_papers_md(cat):
    ids = [f"P{i:02d}" for i in range(1, 82)]
    assert list(load_data()) == ids
    assert [p.id for p in cat] == ids
    shipped = read_abstracts()
    if SHARED_PAPERS.exists():  # the packaged copy must be the project's papers.md
        assert read_abstracts(SHARED_PAPERS.read_text(encoding="utf-8")) == shipped
    for p in cat:
        assert p.title == shipped[p.id][0], p.id
        assert len(p.abstract) > 200, p.id
        assert p.category in CATEGORIES, (p.id, p.category)
        for key in ("short", "mechanism", "equation", "offline", "not_implemented"):
            assert str(p.get(key, "")).strip(), f"{p.id}: empty {key}"
    assert {p.id for p in cat if p.category == "survey"} == {"P23", "P31", "P34", "P36"}


def test_recipes_tests_api_covers_and_results_of_every_entry_exist(cat):
    recipes = set(builtin_recipes())
    registered = {f"{e.family}/{e.name}" for e in formers.entries()}
    for p in cat:
        assert set(p.recipes) <= recipes, (p.id, set(p.recipes) - recipes)
        for f in p.tests.files:
            assert (ROOT / f).is_file(), f"{p.id}: missing claim-test file {f}"
            m = re.fullmatch(r"tests/papers/test_(p\d\d)_\w+\.py", f)
            assert m and m.group(1) == p.id.lower(), (p.id, f)
        for item in p.get("api", []):
            assert resolve_api(item), f"{p.id}: api {item!r} does not exist"
        for c in p.get("covers", []):
            assert set(c.get("uses", [])) <= registered, (p.id, set(c.get("uses", [])) - registered)
            assert all(ID_RE.fullmatch(q) for q in c.get("papers", [])), p.id
        for r in p.results:
            assert set(r.spec) <= {"file", "where", "key", "fmt", "label", "target"}, p.id
            if r.target:
                assert r.target["op"] in ("<", "<=", ">", ">=") and ("than" in r.target) != ("value" in r.target)
                assert (cat.results_dir / r.spec["file"]).exists(), f"{p.id}: a target needs a committed result"
            path = cat.results_dir / r.spec["file"]
            if path.exists():  # a key or column typo would silently never match
                rows = json.loads(path.read_text())["rows"]
                cols = set().union(*rows)
                assert r.spec["key"] in cols and set(r.spec.get("where", {})) <= cols, (p.id, r.spec)
    # recipes come from the components they name: primer.yaml sets mdha and squared_relu (both P79), the ETTh1
    # recipes build the informer model (P73); lm_shakespeare names only baseline components
    assert "primer" in cat.get("P79").recipes and "forecast/informer_etth1_m_24" in cat.get("P73").recipes
    assert not [p.id for p in cat if "lm_shakespeare" in p.recipes]


def test_resolve_api_items():
    assert resolve_api("formers.compress:moefy_model") and resolve_api("cli: formers papers verify")
    assert not resolve_api("formers.compress:no_such_function") and not resolve_api("no_such_module:x")
    assert not resolve_api("cli: formers no-such-command") and not resolve_api("cli: python papers")
    assert not resolve_api("cli: formers")


def test_cli_lists_81_shows_and_filters(cat, capsys):
    assert main(["papers"]) == 0
    out = capsys.readouterr().out
    rows = [ln for ln in out.splitlines() if re.match(r"P\d\d ", ln)]
    assert [r[:3] for r in rows] == [f"P{i:02d}" for i in range(1, 82)]
    counts = cat.counts()
    line = re.search(r"^status: reproduced (\d+)  verified (\d+)  implemented (\d+)  planned (\d+)  \(total 81\)$",
                     out, re.M)
    assert line, out[-400:]
    by_row = [sum(r.split()[-1] == s for r in rows) for s in STATUSES]  # the status column of the 81 rows
    assert [int(n) for n in line.groups()] == by_row == [counts[s] for s in STATUSES] and sum(by_row) == 81
    assert main(["papers", "--category", "survey"]) == 0
    assert [ln[:3] for ln in capsys.readouterr().out.splitlines() if re.match(r"P\d\d ", ln)] == \
        ["P23", "P31", "P34", "P36"]
    assert main(["papers", "list", "--status", "planned"]) == 0
    rows = [ln for ln in capsys.readouterr().out.splitlines() if re.match(r"P\d\d ", ln)]
    assert len(rows) == counts["planned"] and all(ln.rstrip().endswith("planned") for ln in rows)
    parse = make_parser().parse_args
    assert parse(["papers", "--status", "planned", "list"]).status == "planned"  # `list` keeps it
    a = parse(["papers", "--category", "survey", "list", "--status", "verified"])
    assert (a.category, a.status, a.action) == ("survey", "verified", "list")
    assert (parse(["papers"]).status, parse(["papers", "list"]).category) == (None, None)
    assert main(["papers", "--status", "planned", "list"]) == 0
    rows_before = [ln for ln in capsys.readouterr().out.splitlines() if re.match(r"P\d\d ", ln)]
    assert rows_before == rows
    assert main(["papers", "show", "P06"]) == 0
    out = capsys.readouterr().out
    for word in ("SLAB: Efficient Transformers", "mixer      sla", "norm       prepbn", "Equation:", "Usage:",
                 'formers.build("mixer", "sla"', "tests/papers/test_p06_sla.py", "results/attention_scaling.json",
                 "Not implemented:", "Out of reach offline:"):
        assert word in out, word
    assert main(["papers", "show", "P23"]) == 0
    assert "mixer linformer (P25)" in capsys.readouterr().out  # a survey links to the entries that implement it
    assert main(["papers", "show", "P99"]) == 2
    assert "unknown paper 'P99'" in capsys.readouterr().err


def test_usage_snippets_run(cat):
    import torch

    ran = []
    for p in cat:
        if p.usage():
            torch.manual_seed(0)
            with torch.no_grad():
                exec(compile(p.usage(), f"<{p.id} usage>", "exec"), {})  # noqa: S102 - our own snippets
            ran.append(p.id)
    # every paper that formers implements (components or api) shows one, hand-written or generated
    assert {p.id for p in cat if p.implemented} <= set(ran), {p.id for p in cat if p.implemented} - set(ran)
    assert {"P06", "P24", "P42", "P46", "P54", "P73", "P79"} <= set(ran)


def _junit(path: Path, cases: list[tuple[str, str, str]], mtime: float | None = None) -> Path:
    """cases: (module path without .py, test name, 'pass' | 'fail' | 'error' | 'skip')."""
    body = []
    for mod, name, kind in cases:
        inner = {"pass": "", "fail": '<failure message="assert 1 == 2">trace</failure>',
                 "error": '<error message="boom">trace</error>', "skip": '<skipped message="no data"/>'}[kind]
        body.append(f'<testcase classname="{mod.replace("/", ".")}" name="{name}" time="0.01">{inner}</testcase>')
    path.write_text('<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">'
                    + "".join(body) + "</testsuite></testsuites>")
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def _results(folder: Path, sla_speedup: float) -> Path:
    folder.mkdir()
    rows = [{"mixer": "sla", "n": 16384, "causal": True, "speedup_vs_sdpa": sla_speedup}]
    (folder / "attention_scaling.json").write_text(json.dumps({"meta": {}, "rows": rows}))
    return folder


def test_status_is_derived_from_a_fabricated_junit_file(tmp_path):
    p06 = ["tests/papers/test_p06_sla", "tests/papers/test_p06_prepbn"]
    now = time.time()
    old = _junit(tmp_path / "old.xml", [("tests/papers/test_p21_learngene", "test_a", "fail")], now - 5)
    new = _junit(tmp_path / "new.xml", [
        ("tests/papers/test_p21_learngene", "test_a", "pass"),     # overrides old.xml's failure (newer file)
        ("tests/papers/test_p21_learngene", "test_b", "pass"),
        ("tests/papers/test_p12_efficientvit", "test_a", "pass"),
        ("tests/papers/test_p12_efficientvit", "test_b", "fail"),
        ("tests/papers/test_p56_wide", "test_a", "pass"),
        ("tests/papers/test_p56_wide", "test_b", "skip"),
        *[(m, "test_a", "pass") for m in p06],
    ], now)
    cat = Catalog(junit=[new, old], results_dir=_results(tmp_path / "met", 2.0))
    status = {pid: cat.get(pid).status for pid in ("P21", "P12", "P56", "P60", "P01", "P06", "P77")}
    assert status == {
        "P21": "verified",      # components + every claim test passes
        "P12": "implemented",   # a failing claim test
        "P56": "verified",      # tests pass; no components needed to be verified
        "P60": "implemented",   # components, claim tests missing from the junit file
        "P01": "planned",       # nothing
        "P06": "reproduced",    # tests pass and the committed result meets the stated target
        "P77": "implemented",   # its target's result file is absent from this results folder
    }
    assert cat.get("P12").tests.summary == "FAIL 1/2" and cat.get("P60").tests.state == "not run"
    assert cat.get("P56").tests.summary == "1 pass, 1 skip"
    # the same tests against a result that misses the target: verified, not reproduced
    cat = Catalog(junit=[new], results_dir=_results(tmp_path / "missed", 0.5))
    assert cat.get("P06").status == "verified" and cat.get("P06").results[0].met is False
    # a failing claim test blocks `reproduced` even when the target is met
    bad = _junit(tmp_path / "bad.xml", [(p06[0], "test_a", "pass"), (p06[1], "test_a", "error")], now)
    cat = Catalog(junit=[bad], results_dir=tmp_path / "met")
    assert cat.get("P06").status == "implemented" and cat.get("P06").tests.state == "failed"
    # no junit at all: nothing is verified
    assert Catalog(junit=[], results_dir=tmp_path / "missed").counts()["verified"] == 0


def test_the_newest_junit_file_of_a_test_file_wins_and_an_edit_makes_it_stale(tmp_path):
    now = time.time()
    root = tmp_path / "checkout"
    (root / "tests" / "papers").mkdir(parents=True)
    test_file = root / "tests" / "papers" / "test_p56_wide.py"
    test_file.write_text("def test_new():\n    pass\n")
    os.utime(test_file, (now - 300, now - 300))
    mod = "tests/papers/test_p56_wide"
    old = _junit(tmp_path / "old.xml", [(mod, "test_old", "fail")], now - 200)
    new = _junit(tmp_path / "new.xml", [(mod, "test_new", "pass")], now - 100)
    # newer still, but without results for test_p56_wide.py: it must not hide new.xml's
    other = _junit(tmp_path / "other.xml", [("tests/papers/test_p12_efficientvit", "test_a", "pass")], now - 50)
    assert Catalog(root=root, junit=[old]).get("P56").tests.state == "failed"  # old.xml on its own
    for order in ([old, new, other], [other, new, old]):  # mtime decides, not the order given
        t = Catalog(root=root, junit=order).get("P56").tests
        assert (t.state, [c.nodeid for c in t.cases], t.stale) == ("passed", [f"{mod}.py::test_new"], []), order
    os.utime(test_file, (now, now))  # the test file edited after its newest result
    cat = Catalog(root=root, junit=[old, new, other])
    t = cat.get("P56").tests
    assert (t.state, t.cases, t.stale) == ("not run", [], ["tests/papers/test_p56_wide.py"])
    assert cat.get("P56").status == "planned"


def test_verify_runs_the_claim_tests_and_prints_each(tmp_path):
    cat = Catalog(junit=[])
    with pytest.raises(formers.FormersError) as err:
        verify(cat, ["P01", "P02"], out=print, junit_dir=tmp_path)
    assert "no claim tests for P01, P02; papers that have them: " in str(err.value) and "P56" in str(err.value)
    (tmp_path / "bare" / "tests" / "papers").mkdir(parents=True)  # a checkout without claim tests
    with pytest.raises(formers.FormersError, match="no paper has claim tests"):
        verify(Catalog(root=tmp_path / "bare", junit=[]), [], everything=True, junit_dir=tmp_path)
    lines = []
    rc = verify(cat, ["P01", "P56"], out=lines.append, junit_dir=tmp_path)
    text = "\n".join(lines)
    assert lines[0].startswith("no claim tests for P01 (papers that have them: ") and "P56" in lines[0], lines[0]
    per_test = [ln for ln in lines if re.match(r"  (pass|FAIL|ERROR|skip) +tests/papers/test_p56_", ln)]
    assert per_test and rc == (1 if any("FAIL" in ln or "ERROR" in ln for ln in per_test) else 0), text
    junit = tmp_path / "verify-P56.xml"
    assert junit.exists()
    state = Catalog(junit=[junit]).get("P56").tests.state
    assert state == ("passed" if rc == 0 else "failed")


def test_search_ranks_linear_attention_papers_above_unrelated_ones(cat, capsys):
    hits = Index(cat).search("linear attention", k=81)
    rank = {p.id: i for i, (p, _) in enumerate(hits)}
    # papers.md: SLAB's simplified linear attention, ScatterFormer's scattered linear attention, LRA's Linear
    # Transformer / Performer baselines, kernelized (linear-complexity) attention with RPE, cosFormer in P52's search
    linear = ["P06", "P09", "P29", "P35", "P52"]
    unrelated = ["P01", "P04", "P13", "P38", "P50", "P51", "P80", "P81"]
    assert {p.id for p, _ in hits[:2]} == {"P06", "P09"}, [p.id for p, _ in hits[:5]]
    for a in linear:
        for b in unrelated:
            assert rank[a] < rank.get(b, len(cat)), (a, b, [p.id for p, _ in hits[:10]])
    assert main(["papers", "search", "attention", "linear", "in", "memory", "-k", "5"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") >= 2 and "mixer/" in out  # ranked papers with their component names


def test_docs_are_generated_from_the_same_data(cat, tmp_path):
    paths = write_docs(cat, tmp_path)
    assert len(paths) == 82 and (tmp_path / "README.md").exists()
    text = (tmp_path / "P06.md").read_text()
    for part in ("# P06 SLAB", "## Mechanism", "## What formers implements", "`sla`", "## Usage",
                 "## Claim tests", "## Benchmark results", "## Not implemented", "## Abstract"):
        assert part in text, part
    assert "[P25](P25.md)" in (tmp_path / "P23.md").read_text()


def _chrome():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,1000"):
        opts.add_argument(a)
    try:
        return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    except Exception as e:  # noqa: BLE001 - any start failure is the reason to report
        pytest.fail(f"headless Chromium could not start ({CHROMEDRIVER} --headless=new --no-sandbox): "
                    f"{type(e).__name__}: {str(e).strip()[:400]}")


def _visible(driver) -> set[str]:
    """Ids of the cards the browser renders (display != none up the tree: offsetParent is set)."""
    return set(driver.execute_script(
        "return Array.from(document.querySelectorAll('article.card')).filter(c => c.offsetParent !== null)"
        ".map(c => c.id)"))


def test_html_page_filters_cards_in_headless_chromium(cat, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    page = write_html(cat, tmp_path / "site")
    source = page.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", source), "the page must not fetch anything"
    assert "<link" not in source and "@import" not in source
    driver = _chrome()
    try:
        driver.get(page.as_uri())
        assert len(driver.find_elements(By.CSS_SELECTOR, "article.card")) == 81
        assert _visible(driver) == {p.id for p in cat}
        plots = driver.find_elements(By.CSS_SELECTOR, "img.plot")
        assert plots and all(i.get_attribute("src").startswith("data:image/png;base64,") for i in plots)
        box = driver.find_element(By.ID, "q")
        box.send_keys("linear attention")
        shown = _visible(driver)
        assert {"P06", "P09", "P35"} <= shown and not shown & {"P01", "P04", "P80"}, sorted(shown)
        assert driver.find_element(By.ID, "P06").is_displayed() and not driver.find_element(By.ID, "P01").is_displayed()
        assert driver.find_element(By.ID, "count").text == f"{len(shown)} of 81 papers"
        texts = driver.execute_script("return Array.from(document.querySelectorAll('article.card'))"
                                      ".map(c => [c.id, c.getAttribute('data-text'), c.getAttribute('data-status')])")
        # every shown card contains both words, every hidden one lacks one
        assert shown == {i for i, t, _ in texts if "linear" in t and "attention" in t}
        box.clear()
        box.send_keys(" ")  # an input event with an empty query
        Select(driver.find_element(By.ID, "status")).select_by_value("planned")
        assert _visible(driver) == {i for i, _, s in texts if s == "planned"}
        survey = driver.find_element(By.CSS_SELECTOR, 'section[data-category="survey"]')
        assert survey.is_displayed() == any(cat.get(i).status == "planned" for i in ("P23", "P31", "P34", "P36"))
        shot = tmp_path / "papers.png"
        assert driver.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    finally:
        driver.quit()
