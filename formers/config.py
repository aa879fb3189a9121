"""Recipes: YAML with sections `model`, `task`, `train` (and an optional `name`), built-in or from a path,
plus dotted KEY=VALUE overrides. Values are parsed as YAML (`3` is an int, `[1,2]` a list, `true` a bool)."""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from formers.registry import FormersError, _hint

SECTIONS = ("name", "model", "task", "train")


def load_yaml(text: str) -> Any:
    """yaml.safe_load, through libyaml's C loader where PyYAML has it (several times faster, same result)."""
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def builtin_recipes() -> list[str]:
    """Names of the shipped recipes: `lm_shakespeare`, and `vit/vit_tiny_fmnist` for those in sub-folders."""
    def walk(folder, prefix: str):
        for p in folder.iterdir():
            if p.is_dir():
                yield from walk(p, f"{prefix}{p.name}/")
            elif p.name.endswith(".yaml"):
                yield prefix + p.name[:-5]

    return sorted(walk(resources.files("formers") / "recipes", ""))


def load_recipe(recipe: str | Path) -> dict[str, Any]:
    """Load a recipe by built-in name (`lm_shakespeare`, `vit/vit_tiny_fmnist`) or by path to a YAML file."""
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise FormersError(f"recipe file {path} does not exist")
        text, name = path.read_text(), path.stem
    else:
        names = builtin_recipes()
        if str(recipe) not in names:
            raise FormersError(f"unknown recipe '{recipe}'{_hint(str(recipe), names)}; built-in recipes: "
                               f"{', '.join(names)} (or give a path to a .yaml file)")
        *folders, stem = str(recipe).split("/")
        text = (resources.files("formers") / "recipes").joinpath(*folders, f"{stem}.yaml").read_text()
        name = str(recipe)
    cfg = parse_sections(text, f"recipe {recipe}")
    cfg.setdefault("name", name)
    return validate_sections(cfg)


def parse_sections(text: str, where: str) -> dict[str, Any]:
    """YAML text that must be a mapping of sections (a recipe, a run folder's config.yaml); one-line errors naming
    `where` and, for a syntax error, the line and column."""
    try:
        cfg = load_yaml(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise FormersError(f"{where}: invalid YAML{at}: {str(e).splitlines()[0]}") from None
    if not isinstance(cfg, dict):
        raise FormersError(f"{where}: expected a mapping with sections {', '.join(SECTIONS[1:])}")
    return cfg


def validate_sections(cfg: dict[str, Any]) -> dict[str, Any]:
    for key in cfg:
        if key not in SECTIONS:
            raise FormersError(f"unknown section '{key}'{_hint(key, SECTIONS)}; sections: {', '.join(SECTIONS)}")
    for key in ("model", "task", "train"):
        cfg.setdefault(key, {})
        if key in ("model", "task") and isinstance(cfg[key], str):
            cfg[key] = {"name": cfg[key]}
        if not isinstance(cfg[key], dict):
            raise FormersError(f"{key}: expected a mapping, got {cfg[key]!r}")
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise FormersError(f"override '{text}' must look like KEY=VALUE, e.g. train.steps=100")
    key, value = text.split("=", 1)
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:
        parsed = value
    if isinstance(parsed, str):  # YAML 1.1 reads "2e-3" as a string; users mean a number
        try:
            parsed = float(parsed) if any(c in parsed for c in ".eE") else int(parsed)
        except ValueError:
            pass
    parts = key.strip().split(".")
    if not all(parts):
        raise FormersError(f"override '{text}': empty key part")
    return parts, parsed


def apply_overrides(cfg: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides. Setting an option under a component named by a bare string
    (`model.block.mixer.heads=8` where mixer is 'softmax') turns it into a mapping keeping the name."""
    cfg = copy.deepcopy(cfg)
    for text in overrides:
        parts, value = parse_override(text)
        if parts[0] not in SECTIONS:
            raise FormersError(f"override '{text}': unknown section '{parts[0]}'{_hint(parts[0], SECTIONS)}")
        node: Any = cfg
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part) if isinstance(node, dict) else None
            if isinstance(nxt, str) and i > 0:
                nxt = {"name": nxt}
            elif nxt is None:
                nxt = {}
            elif not isinstance(nxt, dict):
                where = ".".join(parts[: i + 1])
                raise FormersError(f"override '{text}': '{where}' is {nxt!r}, not a mapping")
            node[part] = nxt
            node = nxt
        node[parts[-1]] = value
    return validate_sections(cfg)


def dump(cfg: dict[str, Any]) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)
