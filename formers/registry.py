"""The registry: every component is a class (or function) registered under a family and a short name.

    @register("mixer", "softmax", paper="baseline")
    class SoftmaxAttention(nn.Module): ...

    formers.build("mixer", "softmax", dim=64, heads=4, causal=True)

Options are checked against the constructor's signature before anything is built, so a typo is a one-line
error naming the key, the component and the closest valid option.
"""

from __future__ import annotations

import difflib
import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class FormersError(ValueError):
    """A user-facing error: bad config, missing data, wrong input. The CLI prints it as one line, exit status 2."""


FAMILIES = (
    "mixer", "ffn", "act", "norm", "placement", "residual", "stack", "position", "linear",
    "model", "task", "optimizer", "schedule",
)


@dataclass
class Entry:
    family: str
    name: str
    obj: Callable[..., Any]
    paper: str
    aliases: tuple[str, ...] = ()
    causal_ok: bool | None = None
    max_len: int | bool | None = None  # True: bounded by the mixer's `max_len` option (the model's max_len)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def doc(self) -> str:
        """The first line of the docstring."""
        return (inspect.getdoc(self.obj) or "").strip().splitlines()[0] if inspect.getdoc(self.obj) else ""

    def options(self) -> dict[str, inspect.Parameter]:
        return {
            n: p for n, p in _signature(self.obj).parameters.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n != "self"
        }

    def accepts_any(self) -> bool:
        return any(p.kind == p.VAR_KEYWORD for p in _signature(self.obj).parameters.values())


_REGISTRY: dict[str, dict[str, Entry]] = {f: {} for f in FAMILIES}
_ALIASES: dict[str, dict[str, str]] = {f: {} for f in FAMILIES}


def _signature(obj: Callable[..., Any]) -> inspect.Signature:
    return inspect.signature(obj.__init__ if inspect.isclass(obj) else obj)


def family_name(family: str) -> str:
    """Normalise 'mixers' -> 'mixer' and reject unknown families with a suggestion."""
    f = family.lower()
    if f in _REGISTRY:
        return f
    if f.endswith("s") and f[:-1] in _REGISTRY:
        return f[:-1]
    if f.endswith("es") and f[:-2] in _REGISTRY:
        return f[:-2]
    raise FormersError(f"unknown family '{family}'{_hint(family, _REGISTRY)}; families: {', '.join(_REGISTRY)}")


def register(family: str, name: str, *, paper: str, aliases: tuple[str, ...] = (),
             causal_ok: bool | None = None, max_len: int | bool | None = None, **extra: Any):
    """Class/function decorator: register `obj` as `family/name`, citing its paper id (P01..P81 or 'baseline').

    Mixers also record `causal_ok` (whether they can be causal) and `max_len` (True when their parameters depend
    on the sequence length: they take a `max_len` option, which models fill with their own max_len)."""
    if family not in _REGISTRY:
        _REGISTRY[family] = {}
        _ALIASES[family] = {}

    def deco(obj):
        if name in _REGISTRY[family]:
            raise RuntimeError(f"{family} '{name}' is registered twice")
        _REGISTRY[family][name] = Entry(family, name, obj, paper, tuple(aliases), causal_ok, max_len, dict(extra))
        for a in aliases:
            _ALIASES[family][a] = name
        return obj

    return deco


def _hint(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def get(family: str, name: str, path: str | None = None) -> Entry:
    """Look up a registered entry; unknown names raise FormersError naming the closest valid one."""
    _ensure_loaded()
    family = family_name(family)
    table = _REGISTRY[family]
    if not isinstance(name, str):
        raise FormersError(f"{path or family}: expected a {family} name (str), got {name!r}")
    key = _ALIASES[family].get(name, name)
    if key not in table:
        where = f"{path}: " if path else ""
        raise FormersError(
            f"{where}unknown {family} '{name}'{_hint(name, list(table) + list(_ALIASES[family]))}; "
            f"choices: {', '.join(sorted(table))}"
        )
    return table[key]


def entries(family: str | None = None) -> list[Entry]:
    _ensure_loaded()
    fams = [family_name(family)] if family else list(_REGISTRY)
    return [e for f in fams for e in sorted(_REGISTRY[f].values(), key=lambda e: e.name)]


def split_spec(spec: Any, path: str) -> tuple[str, dict[str, Any]]:
    """A spec is a name ('softmax') or a mapping with a 'name' key and options."""
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, dict):
        if "name" not in spec:
            raise FormersError(f"{path}: needs a 'name' key (got keys {sorted(spec)})")
        opts = dict(spec)
        return opts.pop("name"), opts
    raise FormersError(f"{path}: expected a name or a mapping with 'name', got {spec!r}")


def check_options(entry: Entry, options: dict[str, Any], path: str, reserved: tuple[str, ...] = ()) -> None:
    """Unknown option -> one line naming it and the closest valid one; wrong type -> the expected type."""
    valid = entry.options()
    for key, value in options.items():
        if key in reserved:
            raise FormersError(f"{path}: '{key}' is set by the enclosing model; remove it from {path}")
        if key not in valid:
            if entry.accepts_any():
                continue
            choices = [k for k in valid if k not in reserved]
            raise FormersError(
                f"{path}: unknown option '{key}' for '{entry.name}'{_hint(key, choices)}; "
                f"options: {', '.join(choices) or '(none)'}"
            )
        check_type(f"{path}.{key}", value, valid[key].annotation, entry.obj)


_SIMPLE = {"int": int, "float": float, "bool": bool, "str": str, "dict": dict, "list": list, "tuple": tuple}


def _resolve(annotation: Any, owner: Any) -> Any:
    if isinstance(annotation, str):
        module = inspect.getmodule(owner)
        try:
            return eval(annotation, dict(vars(module)) if module else {}, {})  # noqa: S307 - our own annotations
        except Exception:
            return inspect.Parameter.empty
    return annotation


def _type_ok(value: Any, tp: Any) -> bool | None:
    """True/False when the annotation is checkable, None when it is not."""
    if tp is inspect.Parameter.empty or tp is Any:
        return None
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        results = [_type_ok(value, a) for a in typing.get_args(tp)]
        if any(r is True for r in results):
            return True
        return None if any(r is None for r in results) else False
    if tp is type(None):
        return value is None
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    base = origin or tp
    if base is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if base in (list, tuple, typing.Sequence):
        return isinstance(value, (list, tuple))
    if isinstance(base, type):
        return isinstance(value, base)
    return None


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(origin or tp, "__name__", str(tp))


def check_type(path: str, value: Any, annotation: Any, owner: Any) -> None:
    tp = _resolve(annotation, owner)
    if _type_ok(value, tp) is False:
        raise FormersError(f"{path}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def build(family: str, spec: Any, *, path: str | None = None, reserved: tuple[str, ...] = (), **options: Any):
    """Build a registered component from a name or spec mapping plus keyword options.

    `formers.build("mixer", "softmax", dim=64, heads=4)` or `build("mixer", {"name": "softmax", "heads": 4}, dim=64)`.
    Options in the spec are checked (unknown keys, types); keyword options given by the caller win.
    """
    family = family_name(family)
    path = path or family
    name, spec_opts = split_spec(spec, path)
    entry = get(family, name, path)
    check_options(entry, spec_opts, path, reserved)
    check_options(entry, {k: v for k, v in options.items() if k not in reserved}, path)
    merged = {**spec_opts, **options}
    if not entry.accepts_any():
        valid = entry.options()
        # Reserved options the component does not take (e.g. `causal` for a norm) are dropped quietly.
        merged = {k: v for k, v in merged.items() if k in valid or k not in reserved}
    return entry.obj(**merged)


_LOADED = False


def _ensure_loaded() -> None:
    """Import every module that registers components (idempotent)."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    import formers.models  # noqa: F401
    import formers.nn  # noqa: F401
    import formers.tasks  # noqa: F401
    import formers.train  # noqa: F401
