"""The catalog's data model: `papers.yaml` joined with the registry, the recipes, the claim tests and the results.

Nothing about a paper's state is typed by hand. `Catalog()` derives, for every entry of `papers.yaml`:
  components   the registry's entries whose paper id is the entry's (`formers.entries()`, DESIGN 2)
  api          functions/commands listed in the entry that exist (e.g. `formers.compress:moefy`)
  recipes      built-in recipes naming one of the components, plus the entry's own `recipes:`
  claim tests  tests/papers/test_pNN_*.py plus the entry's `tests:`, with their last junit results
  results      the rows of results/*.json the entry names, and whether each meets its target
  status       reproduced > verified > implemented > planned (see `derive_status`)
"""

from __future__ import annotations

import functools
import importlib
import json
import math
import operator
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from formers.config import load_yaml
from formers.registry import FormersError

HERE = Path(__file__).resolve().parent
DATA = HERE / "papers.yaml"
ABSTRACTS = HERE / "abstracts.md"  # a copy of ../shared/papers/papers.md, shipped so search works when installed

STATUSES = ("reproduced", "verified", "implemented", "planned")
CATEGORIES = (
    "attention", "token-mixer", "norm", "ffn/activation", "block/architecture", "memory/recurrence",
    "vision-backbone", "compression", "training-method", "finetuning/PEFT", "generative", "analysis",
    "benchmark/dataset", "application", "survey",
)
ID_RE = re.compile(r"P(0[1-9]|[1-7]\d|8[01])")
# Families in the order a paper's "main" component is picked for its usage snippet.
FAMILY_ORDER = ("mixer", "ffn", "act", "norm", "placement", "residual", "stack", "linear", "position", "model",
                "task", "optimizer", "schedule")
_OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}


def repo_root() -> Path:
    """The checkout that holds this package (tests/, results/, .junit/ live there in an editable install)."""
    return HERE.parents[1]


def read_abstracts(text: str | None = None) -> dict[str, tuple[str, str]]:
    """papers.md -> {id: (title, abstract)}."""
    text = ABSTRACTS.read_text(encoding="utf-8") if text is None else text
    out = {}
    for block in re.split(r"^## ", text, flags=re.M)[1:]:
        head, _, body = block.partition("\n")
        m = re.match(r"(P\d\d)\. (.+)", head.strip())
        if m:
            out[m.group(1)] = (m.group(2).strip(), body.strip())
    return out


# ---------------------------------------------------------------------------------------------------- records

@dataclass
class Component:
    family: str
    name: str
    paper: str
    doc: str

    @property
    def ref(self) -> str:
        return f"{self.family}/{self.name}"


@dataclass
class TestCase:
    nodeid: str  # tests/papers/test_p06_sla.py::test_x
    outcome: str  # passed | failed | error | skipped
    seconds: float = 0.0
    message: str = ""
    source: str = ""  # the junit file it came from
    mtime: float = 0.0  # that file's modification time

    @property
    def file(self) -> str:
        return self.nodeid.split("::", 1)[0]


@dataclass
class ClaimTests:
    files: list[str]
    cases: list[TestCase]
    state: str  # none | not run | passed | failed
    stale: list[str] = field(default_factory=list)  # files edited after their last result

    @property
    def summary(self) -> str:
        if self.state == "none":
            return "-"
        n = {k: sum(c.outcome == k for c in self.cases) for k in ("passed", "failed", "error", "skipped")}
        if self.state == "not run":
            return f"not run ({len(self.files)} file{'s' * (len(self.files) != 1)})"
        if self.state == "failed":
            return f"FAIL {n['failed'] + n['error']}/{len(self.cases)}"
        return f"{n['passed']} pass" + (f", {n['skipped']} skip" if n["skipped"] else "")


@dataclass
class Result:
    spec: dict[str, Any]
    value: float | None = None
    reference: float | None = None  # the `than` row's value
    met: bool | None = None  # None: no target, or nothing measured yet
    note: str = ""  # why there is no value

    @property
    def file(self) -> str:
        return "results/" + self.spec["file"]

    @property
    def target(self) -> dict[str, Any] | None:
        return self.spec.get("target")

    def text(self) -> str:
        """The measured value, formatted (callers show `note` instead when there is no value)."""
        return _fmt(self.spec.get("fmt", "{:.4g}"), self.value)

    def target_text(self) -> str:
        t = self.target
        if not t:
            return ""
        if "than" in t:
            ref = ", ".join(f"{k}={v}" for k, v in t["than"].items())
            rv = "?" if self.reference is None else _fmt("{:.4g}", self.reference)
            goal = f"{self.spec['key']} {t['op']} that of {ref} ({rv})"
        else:
            goal = f"{self.spec['key']} {t['op']} {t['value']}"
        verdict = {True: "met", False: "NOT met", None: "not measured yet"}[self.met]
        return f"target {goal}: {verdict}"


def _fmt(fmt: str, value: float) -> str:
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


@dataclass
class Paper:
    id: str
    title: str
    short: str
    category: str
    abstract: str
    data: dict[str, Any]
    components: list[Component] = field(default_factory=list)
    api: list[str] = field(default_factory=list)  # the entry's api items that resolve
    recipes: list[str] = field(default_factory=list)
    tests: ClaimTests | None = None
    results: list[Result] = field(default_factory=list)
    covers: list[dict[str, Any]] = field(default_factory=list)
    status: str = "planned"
    reasons: list[str] = field(default_factory=list)

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    @property
    def implemented(self) -> bool:
        return bool(self.components or self.api)

    @property
    def headline(self) -> str:
        for r in self.results:
            if r.value is not None:
                return r.text()
        return ""

    def main_component(self) -> Component | None:
        def rank(c: Component):
            fam = FAMILY_ORDER.index(c.family) if c.family in FAMILY_ORDER else len(FAMILY_ORDER)
            return (fam, "tiny" not in c.name, c.name)  # models: the small 28x28 variant first

        return min(self.components, key=rank) if self.components else None

    def usage(self) -> str:
        return self.get("usage") or default_usage(self.main_component()) or ""

    def search_text(self) -> str:
        comps = " ".join(c.name for c in self.components)  # names only: docstrings would outweigh the abstract
        parts = [self.title, self.title, self.short, self.category, self.get("mechanism", ""),
                 self.get("equation", ""), self.abstract, comps]
        return "\n".join(parts)


# ---------------------------------------------------------------------------------------------------- usage

class Slot(NamedTuple):
    """Where a family's component goes in a model config, and how a usage snippet calls one on its own."""

    path: str  # dotted, under `model:` (a recipe override is `model.<path>=<name>`)
    build: str | None = None  # options of a standalone `formers.build(family, name, ...)`; None: no standalone call
    sample: str = ""  # the shape of that call's input
    extra: tuple[tuple[str, Any], ...] = ()  # what the model config needs next to the name (`act` lives in an ffn)


# The one family -> slot table: usage snippets, recipe overrides (render._override) and the components a recipe
# names (_recipe_refs) all read it.
_SLOT: dict[str, Slot] = {
    "mixer": Slot("block.mixer.name", "dim=64, heads=4", "2, 128, 64", (("heads", 4),)),
    "ffn": Slot("block.ffn.name", "dim=64", "2, 16, 64"),
    "act": Slot("block.ffn.act", "", "4, 8", (("name", "mlp"),)),
    "norm": Slot("block.norm", "dim=64", "2, 16, 64"),
    "placement": Slot("block.placement"),
    "residual": Slot("block.residual"),
    "stack": Slot("stack"),
    "position": Slot("position"),
}
# the config key that names a family's component: `mixer: {name: sla}`, `act: squared_relu`, `stack: looped`
_SLOT_KEY = {[k for k in s.path.split(".") if k != "name"][-1]: fam for fam, s in _SLOT.items()}


def _slot_config(family: str, name: str) -> dict[str, Any]:
    """The model options that put component `name` in its slot: ("act", "x") -> {"block": {"ffn": {"name": "mlp",
    "act": "x"}}}."""
    slot = _SLOT[family]
    *outer, leaf = slot.path.split(".")
    node: dict[str, Any] = dict(sorted({**dict(slot.extra), leaf: name}.items(), key=lambda kv: kv[0] != "name"))
    for key in reversed(outer):
        node = {key: node}
    return node


def default_usage(c: Component | None) -> str:
    """A small runnable snippet for a component, by family (entries may give their own `usage:`)."""
    if c is None:
        return ""
    head = "import torch\nimport formers\n\n"
    n = c.name
    if c.family == "model":
        if "tiny" in n:  # the 28x28 variants of the vision benchmark
            return (head + f'model = formers.create_model("{n}")\n'
                    f"logits = model(torch.randn(2, 1, 28, 28))          # Fashion-MNIST-sized images -> (2, 10)\n"
                    f"# formers train vit/vit_tiny_fmnist model.name={n}")
        return (head + f'model = formers.create_model("{n}")\n'
                f"print(model.num_params())")
    slot = _SLOT.get(c.family)
    if slot is None:
        return ""
    model, opts, build, lines = "lm", "", slot.build, []
    if c.family == "mixer":  # a bidirectional-only mixer goes in an encoder; some take a max_len
        from formers.registry import get

        e = get(c.family, n)
        build += f", causal={bool(e.causal_ok)}" + (", max_len=128" if e.max_len else "")
        if not e.causal_ok:
            model, opts = "encoder", ", num_classes=2"
    if build is not None:
        var = "attn" if c.family == "mixer" else c.family
        shape = "# (B, N, D) -> (B, N, D)" if slot.sample.count(",") == 2 else "# elementwise: same shape"
        lines += [f'{var} = formers.build("{c.family}", "{n}"{", " + build if build else ""})',
                  f"y = {var}(torch.randn({slot.sample}))".ljust(52) + shape]
    kw = ", ".join(f"{k}={json.dumps(v)}" for k, v in _slot_config(c.family, n).items())
    lines += [f'model = formers.create_model("{model}", vocab=256, dim=64, depth=2, max_len=128{opts},',
              f"                             {kw})",
              "logits = model(torch.randint(0, 256, (2, 128)))"]
    return head + "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- junit

def read_junit(paths: list[str | Path]) -> dict[str, list[TestCase]]:
    """Test results from junit XML files, by test file (`tests/papers/test_p06_sla.py`): each test file keeps only
    the cases of the newest junit file (by mtime; on a tie the later in `paths`) that has results for it, so a test
    renamed or deleted since an older run leaves no stale result behind."""
    newest: dict[str, tuple[float, int, dict[str, TestCase]]] = {}  # test file -> (mtime, order, cases by node id)
    for order, path in enumerate(Path(p) for p in paths):
        try:
            mtime = path.stat().st_mtime
            root = ET.parse(path).getroot()
        except (OSError, ET.ParseError):
            continue
        found: dict[str, dict[str, TestCase]] = {}
        for tc in root.iter("testcase"):
            parts = tc.get("classname", "").split(".")
            mods = [i for i, p in enumerate(parts) if p.startswith("test_")]
            if not mods:
                continue
            i = mods[-1]
            nodeid = "/".join(parts[: i + 1]) + ".py::" + "::".join([*parts[i + 1:], tc.get("name", "")])
            outcome, message = "passed", ""
            for tag in ("failure", "error", "skipped"):
                el = tc.find(tag)
                if el is not None:
                    outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                    message = (el.get("message") or el.text or "").strip().splitlines()[0:1]
                    message = message[0] if message else ""
                    break
            case = TestCase(nodeid, outcome, float(tc.get("time") or 0.0), message, str(path), mtime)
            found.setdefault(case.file, {})[nodeid] = case
        for f, cases in found.items():
            if f not in newest or (mtime, order) >= newest[f][:2]:
                newest[f] = (mtime, order, cases)
    return {f: list(cases.values()) for f, (_, _, cases) in newest.items()}


def claim_state(files: list[str], junit: dict[str, list[TestCase]], root: Path) -> ClaimTests:
    """passed: every file has results, none failed, at least one passed; failed: any failure or error.
    `junit` is read_junit's answer; a test file edited after its newest result counts as not run (stale)."""
    if not files:
        return ClaimTests([], [], "none")
    cases, stale, missing = [], [], False
    for f in files:
        mine = junit.get(f, [])
        path = root / f
        if mine and path.exists() and path.stat().st_mtime > mine[0].mtime + 1:  # changed after this result
            stale.append(f)
            mine = []
        if not mine:
            missing = True
        cases += mine
    if any(c.outcome in ("failed", "error") for c in cases):
        state = "failed"
    elif missing or not any(c.outcome == "passed" for c in cases):
        state = "not run"
    else:
        state = "passed"
    return ClaimTests(list(files), cases, state, stale)


# ---------------------------------------------------------------------------------------------------- results

def _matches(row: dict[str, Any], where: dict[str, Any]) -> bool:
    return all(row.get(k) == v for k, v in where.items())


def _pick(rows: list[dict[str, Any]], where: dict[str, Any], key: str) -> float | None:
    hits = [r for r in rows if _matches(r, where) and isinstance(r.get(key), (int, float))]
    if not hits:
        return None
    v = float(hits[-1][key])  # the last matching row: benchmarks append, the final record comes last
    return v if math.isfinite(v) else None


def measure(spec: dict[str, Any], results_dir: Path, cache: dict[Path, list[dict[str, Any]] | None]) -> Result:
    """One `results:` item against its file ({"meta", "rows"}, as formers.bench writes it); `cache` holds the rows
    read so far by path (None: no readable file)."""
    from formers.bench.harness import load_rows

    r = Result(spec)
    path = results_dir / spec["file"]
    if path not in cache:
        try:
            cache[path] = load_rows(path) if path.exists() else None
        except (OSError, ValueError):  # unreadable or not JSON
            cache[path] = None
    rows = cache[path]
    if rows is None:
        r.note = "no result file yet"
        return r
    r.value = _pick(rows, spec.get("where", {}), spec["key"])
    if r.value is None:
        r.note = "no matching row yet"
        return r
    t = spec.get("target")
    if t:
        if "than" in t:
            r.reference = _pick(rows, t["than"], spec["key"])
            r.met = None if r.reference is None else bool(_OPS[t["op"]](r.value, r.reference))
        else:
            r.met = bool(_OPS[t["op"]](r.value, float(t["value"])))
    return r


# ---------------------------------------------------------------------------------------------------- status

def derive_status(implemented: bool, tests: ClaimTests, results: list[Result],
                  extra: tuple[str, ...] = ()) -> tuple[str, list[str]]:
    """reproduced: every stated target is met by its committed result and no claim test fails;
    verified: the claim tests exist and pass (a fresh `verify` or `make test`'s junit);
    implemented: components are registered (or the entry's api exists); planned: otherwise."""
    reasons = list(extra)
    targets = [r for r in results if r.target]
    if implemented:
        reasons.append("components registered")
    if tests.state != "none":
        reasons.append(f"claim tests {tests.state}" + (f" ({tests.summary})" if tests.state != "not run" else ""))
    for r in targets:
        reasons.append(f"{r.file}: {r.target_text()}")
    if targets and all(r.met for r in targets) and tests.state != "failed":
        return "reproduced", reasons
    if tests.state == "passed":
        return "verified", reasons
    if implemented:
        return "implemented", reasons
    return "planned", reasons or ["nothing registered"]


# ---------------------------------------------------------------------------------------------------- catalog

def components_by_paper() -> dict[str, list[Component]]:
    """Registered components by paper id (`baseline` for the standard ones); each names one paper."""
    from formers.registry import entries

    out: dict[str, list[Component]] = {}
    for e in entries():
        out.setdefault(e.paper, []).append(Component(e.family, e.name, e.paper, e.doc))
    return out


def _recipe_refs(cfg: Any, family: str | None = None) -> list[tuple[str, str]]:
    """(family, name) pairs a config section names: its own `name` (as `family`), and every slot of _SLOT
    (block mixer/ffn/act/norm/..., stack, position), as a bare name or a mapping with a name, at any depth."""
    refs = []
    if isinstance(cfg, dict):
        if family and isinstance(cfg.get("name"), str):
            refs.append((family, cfg["name"]))
        for k, v in cfg.items():
            fam = _SLOT_KEY.get(k)
            if fam and isinstance(v, str):
                refs.append((fam, v))
            elif isinstance(v, (dict, list)):
                refs += _recipe_refs(v, fam)
    elif isinstance(cfg, list):
        for v in cfg:
            refs += _recipe_refs(v, family)
    return refs


def recipes_by_paper() -> dict[str, list[str]]:
    """Built-in recipe names by the paper id of each component they name (model, task, block slots)."""
    from formers.config import builtin_recipes, load_recipe
    from formers.registry import get

    out: dict[str, list[str]] = {}
    for name in builtin_recipes():
        cfg = load_recipe(name)
        for fam, comp in sorted(set(_recipe_refs(cfg["model"], "model") + _recipe_refs(cfg["task"], "task"))):
            try:
                pid = get(fam, comp).paper
            except FormersError:
                continue
            if name not in out.setdefault(pid, []):
                out[pid].append(name)
    return out


@functools.cache
def _cli_commands() -> frozenset[str]:
    from formers.cli import make_parser

    sub = next(a for a in make_parser()._actions if a.dest == "cmd")
    return frozenset(sub.choices)


def resolve_api(item: str) -> bool:
    """'module:attr' exists, or 'cli: formers CMD' is a sub-command of the CLI."""
    if item.startswith("cli:"):
        words = item[4:].split()
        return len(words) >= 2 and words[0] == "formers" and words[1] in _cli_commands()
    mod, _, attr = item.partition(":")
    try:
        return hasattr(importlib.import_module(mod), attr) if attr else True
    except ImportError:
        return False


def load_data(path: Path = DATA) -> dict[str, dict[str, Any]]:
    data = load_yaml(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise FormersError(f"{path}: expected a mapping of paper ids to entries")
    return data


class Catalog:
    """All 81 papers with derived components, recipes, claim tests, results and status.

    root: the checkout (tests/, results/, .junit/); junit: the junit XML files to read (default root/.junit/*.xml);
    results_dir: where the `results:` files live (default root/results)."""

    def __init__(self, root: str | Path | None = None, junit: list[str | Path] | None = None,
                 results_dir: str | Path | None = None):
        self.root = Path(root) if root else repo_root()
        self.results_dir = Path(results_dir) if results_dir else self.root / "results"
        self.junit_paths = [Path(p) for p in junit] if junit is not None else \
            sorted((self.root / ".junit").glob("*.xml"))
        self.has_tests = (self.root / "tests" / "papers").is_dir()
        data = load_data()
        abstracts = read_abstracts()
        comps = components_by_paper()
        by_ref = {c.ref: c for cs in comps.values() for c in cs}
        recipes = recipes_by_paper()
        junit_cases = read_junit(self.junit_paths)
        cache: dict[Path, Any] = {}
        self.papers: dict[str, Paper] = {}
        for pid, d in data.items():
            title, abstract = abstracts.get(pid, (d.get("title", ""), ""))
            p = Paper(pid, d.get("title", title), d.get("short", pid), d.get("category", ""), abstract, d)
            p.components = sorted(comps.get(pid, []), key=lambda c: (c.family, c.name))
            p.api = [a for a in d.get("api", []) if resolve_api(a)]
            p.recipes = sorted(set(recipes.get(pid, [])) | set(d.get("recipes", [])))
            files = sorted({f"tests/papers/{f.name}" for f in (self.root / "tests" / "papers").glob(
                f"test_{pid.lower()}_*.py")} | set(d.get("tests", [])))
            p.tests = claim_state(files, junit_cases, self.root)
            p.results = [measure(s, self.results_dir, cache) for s in d.get("results", [])]
            p.covers = [self._cover(c, by_ref) for c in d.get("covers", [])]
            note = ()
            if p.covers:
                have = sum(bool(c["components"]) for c in p.covers)
                note = (f"a survey: {have} of {len(p.covers)} techniques it covers have formers components",)
            p.status, p.reasons = derive_status(p.implemented, p.tests, p.results, note)
            self.papers[pid] = p

    @staticmethod
    def _cover(item: dict[str, Any], by_ref: dict[str, Component]) -> dict[str, Any]:
        found = [by_ref[u] for u in item.get("uses", []) if u in by_ref]
        return {"technique": item["technique"], "components": found, "papers": list(item.get("papers", [])),
                "missing": [u for u in item.get("uses", []) if u not in by_ref]}

    def __iter__(self):
        return iter(self.papers.values())

    def __len__(self) -> int:
        return len(self.papers)

    def get(self, pid: str) -> Paper:
        key = pid.upper().strip()
        if re.fullmatch(r"P?\d{1,2}", key):
            key = f"P{int(key.lstrip('P')):02d}"
        if key not in self.papers:
            by_short = {p.short.lower(): p.id for p in self}
            if pid.lower() in by_short:
                return self.papers[by_short[pid.lower()]]
            raise FormersError(f"unknown paper '{pid}': use an id P01..P81 or a short name such as "
                               f"{', '.join(sorted(by_short)[:3])} (see `formers papers`)")
        return self.papers[key]

    def counts(self) -> dict[str, int]:
        return {s: sum(p.status == s for p in self) for s in STATUSES}

    def select(self, category: str | None = None, status: str | None = None) -> list[Paper]:
        if category and category not in CATEGORIES:
            close = [c for c in CATEGORIES if category.lower() in c]
            if len(close) == 1:
                category = close[0]
            else:
                raise FormersError(f"--category: unknown '{category}'; choices: {', '.join(CATEGORIES)}")
        if status and status not in STATUSES:
            raise FormersError(f"--status: unknown '{status}'; choices: {', '.join(STATUSES)}")
        return [p for p in self if (not category or p.category == category) and (not status or p.status == status)]
