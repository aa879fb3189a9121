"""`formers ...` / `python -m formers ...`: train, eval, generate, forecast, list, show, data, papers."""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys

from formers.registry import FormersError


def _cmd_train(a) -> int:
    from formers.train.distributed import env_ranks
    from formers.train.trainer import train

    if a.nproc is not None and a.nproc < 1:
        raise FormersError(f"--nproc: give a number of processes >= 1, got {a.nproc}")
    if a.nproc is not None and a.nproc > 1:
        return _launch_train(a)
    result = train(a.recipe, a.overrides, out=a.out, resume=a.resume, force=a.force)
    if env_ranks()[0]:  # under torchrun rank 0 reports
        return 0
    metrics = {k: v for k, v in result.items() if k not in ("sample", "run_dir", "final")}
    print("final: " + "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
    if result.get("sample"):
        print("sample:\n" + result["sample"])
    print(f"run folder: {result['run_dir']} (config.yaml, metrics.jsonl, loss.png, summary.md, model.safetensors)")
    return 0


def _without_nproc(argv: list[str]) -> list[str]:
    """The command line minus its `--nproc N` / `--nproc=N` (or an abbreviation argparse accepted)."""
    out, i = [], 0
    while i < len(argv):
        flag = argv[i].split("=", 1)[0]
        if argv[i] == "--":
            out += argv[i:]
            break
        if len(flag) >= 3 and "--nproc".startswith(flag):
            i += 1 if "=" in argv[i] else 2
            continue
        out.append(argv[i])
        i += 1
    return out


def _launch_train(a) -> int:
    """`--nproc N`: check the request here, then run this very command, less `--nproc N`, in N processes."""
    from formers.train import distributed
    from formers.train.trainer import check_launch

    if "WORLD_SIZE" in os.environ:
        raise FormersError("--nproc: this process already runs under torchrun; drop --nproc (torchrun's "
                           "--nproc-per-node sets the number of processes)")
    check_launch(a.recipe, a.overrides, a.nproc, out=a.out, resume=a.resume, force=a.force)
    return distributed.launch(_without_nproc(a.argv), a.nproc)


def _cmd_eval(a) -> int:
    from formers.train.trainer import build_task, load_run

    model = load_run(a.run)
    task = build_task(model.run_config["task"])
    metrics = task.evaluate(model, limit=a.limit)
    print(json.dumps(metrics))
    return 0


def _cmd_generate(a) -> int:
    from formers.tasks.lm_bytes import generate_text
    from formers.train.trainer import load_run

    if a.tokens < 1:
        raise FormersError(f"generate: --tokens must be >= 1, got {a.tokens}")
    model = load_run(a.run)
    if not hasattr(model, "generate"):
        raise FormersError(f"the model in {a.run} does not generate text (it is not an `lm`)")
    text = generate_text(model, a.prompt, a.tokens, temperature=0.0 if a.greedy else a.temperature,
                         top_k=a.top_k, seed=a.seed)
    print(text)
    return 0


def _cmd_forecast(a) -> int:
    from formers.tasks.forecast import ForecastTask, plot_forecast
    from formers.train.trainer import build_task, load_run

    model = load_run(a.run)
    task = build_task(model.run_config["task"])
    if not isinstance(task, ForecastTask):
        raise FormersError(f"{a.run} is not a forecasting run (task '{model.run_config['task'].get('name')}'); "
                           "give a run of the `forecast` task")
    r = task.forecast_csv(model, a.csv, backtest=a.backtest)
    cols = r["columns"] + ([f"true_{c}" for c in r["columns"]] if r["truth"] is not None else [])
    print(",".join(["date", *cols]))
    for i, d in enumerate(r["dates"]):
        vals = list(r["forecast"][i]) + (list(r["truth"][i]) if r["truth"] is not None else [])
        print(",".join([str(d).replace("T", " ")] + [f"{v:.6g}" for v in vals]))
    if a.backtest:
        print(f"backtest on the last {len(r['dates'])} rows (scaled, as in training): mse={r['mse']:.4f} "
              f"mae={r['mae']:.4f}", file=sys.stderr)
    if a.out:
        kind = "backtest" if a.backtest else "forecast"
        print(f"plot: {plot_forecast(r, a.out, title=f'{a.run}: {kind} of {a.csv}')}", file=sys.stderr)
    return 0


def _fmt_default(p: inspect.Parameter) -> str:
    return "required" if p.default is inspect.Parameter.empty else repr(p.default)


def _cmd_list(a) -> int:
    from formers.config import builtin_recipes
    from formers.registry import entries, family_name

    if a.family and a.family.lower() in ("recipe", "recipes"):
        print("\n".join(builtin_recipes()))
        return 0
    fam = family_name(a.family) if a.family else None
    current = None
    for e in entries(fam):
        if e.family != current:
            current = e.family
            print(f"\n{current}:")
        flags = []
        if e.causal_ok is not None:
            bidir = e.extra.get("bidirectional_ok", True)
            flags.append(("causal" if bidir else "causal only") if e.causal_ok else "bidirectional only")
        if e.max_len:
            flags.append("max_len" if e.max_len is True else f"max_len {e.max_len}")
        alias = f" (alias {', '.join(e.aliases)})" if e.aliases else ""
        print(f"  {e.name:<16} {e.paper:<9} {'; '.join(flags):<28} {e.doc}{alias}")
    if not fam:
        print("\nrecipes:\n  " + "\n  ".join(builtin_recipes()))
    return 0


def _cmd_show(a) -> int:
    from formers.registry import get

    e = get(a.family, a.name)
    print(f"{e.family} '{e.name}'  paper: {e.paper}  ({e.obj.__module__}.{e.obj.__qualname__})")
    if e.causal_ok is not None:
        print(f"causal: {'yes' if e.causal_ok else 'no (bidirectional only)'}")
        if e.extra.get("bidirectional_ok", True) is False:
            print("bidirectional: no (causal only)")
    if e.max_len:
        print("max_len: its `max_len` option (models pass their own max_len); longer inputs raise an error"
              if e.max_len is True else f"max_len: {e.max_len}")
    if e.aliases:
        print(f"aliases: {', '.join(e.aliases)}")
    print("options:")
    for name, p in e.options().items():
        ann = p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", "")
        print(f"  {name:<16} {str(ann):<22} default {_fmt_default(p)}")
    print()
    print(inspect.getdoc(e.obj) or "")
    return 0


def _cmd_data(a) -> int:
    from formers.data import SOURCES, cache_dir, get_source
    from formers.data.sources import DEFAULT_SOURCES

    if a.action == "list":
        print(f"cache: {cache_dir()}")
        for s in SOURCES.values():
            print(f"  {s.name:<14} {'ready' if s.ready() else 'missing':<8} {s.description}")
        return 0
    names = a.names or (list(DEFAULT_SOURCES) if a.defaults else [])
    if not names:
        raise FormersError("formers data fetch: name a source (see `formers data list`) or pass --defaults")
    for n in names:
        s = get_source(n)
        if s.ready():
            print(f"{n}: ready")
            continue
        print(f"{n}: preparing ...", flush=True)
        try:
            s.fetch()
        except FormersError as e:
            if not a.defaults or a.names:
                raise
            print(f"{n}: skipped ({e})")  # setup goes on; whatever needs the source names the fix again
            continue
        print(f"{n}: ready")
    return 0


def _cmd_convert(a) -> int:
    from formers.compress import convert_run

    out = convert_run(a.run, a.out, a.to)
    print(f"converted {a.run} -> {out} ({a.to}); load it with formers.load_run('{out}')")
    return 0


def _parse_layers(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise FormersError(f"--layers takes comma-separated layer indices such as 0,2; got {text!r}") from None


def _cmd_moefy(a) -> int:
    from formers.compress import moefy_run

    out = a.out or f"{str(a.run).rstrip('/')}-emoe-e{a.experts}-k{a.k}"
    layers = _parse_layers(a.layers)
    path = moefy_run(a.run, out, a.experts, a.k, layers=layers, clustering=a.clustering, learn_gate=a.learn_gate,
                     seed=a.seed)
    which = "all layers" if layers is None else "layers " + ",".join(str(i) for i in sorted(set(layers)))
    gate = "learned gate, softmax combine" if a.learn_gate else "fixed centroid gate, unit combine"
    print(f"moefied {a.run} -> {path}: the mlp FFN of {which} split into {a.experts} experts, top-{a.k} "
          f"({a.clustering} clustering, {gate}); load it with formers.load_run('{path}')")
    return 0


def _cmd_bench(a) -> int:
    if a.what == "attention":
        from formers.bench.attention import main as bench_attention

        return bench_attention(a.args)
    if a.what == "lra":
        from formers.bench.lra import main as bench_lra

        return bench_lra(a.args)
    if a.what == "speed":
        from formers.bench.speed import main as bench_speed

        return bench_speed(a.args)
    raise FormersError(f"unknown benchmark '{a.what}'")


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="formers", description="Transformers of 81 papers: build, train, evaluate.")
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train a recipe (built-in name or YAML path) with KEY=VALUE overrides")
    t.add_argument("recipe")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.block.mixer.heads=8 train.steps=100")
    t.add_argument("--out", help="run folder (default runs/<recipe name>)")
    t.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    t.add_argument("--force", action="store_true", help="replace an existing run in the folder")
    t.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="data-parallel training in N processes on this node (torchrun; docs/distributed.md)")
    t.set_defaults(fn=_cmd_train)

    e = sub.add_parser("eval", help="evaluate a run on its task's held-out split")
    e.add_argument("run")
    e.add_argument("--limit", type=int, default=None, help="evaluate on a prefix only")
    e.set_defaults(fn=_cmd_eval)

    g = sub.add_parser("generate", help="generate text from a trained lm run")
    g.add_argument("run")
    g.add_argument("--prompt", default="\n")
    g.add_argument("--tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--greedy", action="store_true")
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(fn=_cmd_generate)

    f = sub.add_parser("forecast", help="forecast from your own CSV with a trained forecast run (its scaler)")
    f.add_argument("run")
    f.add_argument("--csv", required=True, help="CSV with a date column and the run's columns")
    f.add_argument("--out", default=None, help="PNG of the forecast (and the truth with --backtest)")
    f.add_argument("--backtest", action="store_true",
                   help="predict the CSV's last pred_len rows from the rows before them and score against them")
    f.set_defaults(fn=_cmd_forecast)

    ls = sub.add_parser("list", help="list registered components (optionally one family) and recipes")
    ls.add_argument("family", nargs="?")
    ls.set_defaults(fn=_cmd_list)

    s = sub.add_parser("show", help="show one component: options, defaults, paper, docstring")
    s.add_argument("family")
    s.add_argument("name")
    s.set_defaults(fn=_cmd_show)

    d = sub.add_parser("data", help="the data cache: list sources, fetch one")
    d.add_argument("action", choices=["list", "fetch"])
    d.add_argument("names", nargs="*")
    d.add_argument("--defaults", action="store_true", help="fetch the default sources")
    d.set_defaults(fn=_cmd_data)

    c = sub.add_parser("convert", help="convert a trained Pre-LN run to an equivalent Pre-(C)RMSNorm run (P54)")
    c.add_argument("run")
    c.add_argument("--to", required=True, choices=["prermsnorm", "precrmsnorm"])
    c.add_argument("--out", required=True, help="new run folder")
    c.set_defaults(fn=_cmd_convert)

    m = sub.add_parser("moefy", help="split a trained run's mlp FFNs into top-k experts without new parameters "
                                     "(EMoE, P46)")
    m.add_argument("run")
    m.add_argument("--experts", type=int, required=True, help="experts per layer; must divide the FFN width")
    m.add_argument("--k", type=int, required=True, help="experts each token uses (k = experts: the dense FFN)")
    m.add_argument("--layers", default=None, help="comma-separated layer indices, e.g. 0,2 (default: all)")
    m.add_argument("--out", default=None, help="new run folder (default <run>-emoe-e<experts>-k<k>)")
    m.add_argument("--clustering", default="balanced_kmeans", choices=["balanced_kmeans", "random", "contiguous"])
    m.add_argument("--learn-gate", action="store_true", help="train the router (softmax combine) instead of fixing it")
    m.add_argument("--seed", type=int, default=0, help="seed of the clustering")
    m.set_defaults(fn=_cmd_moefy)

    b = sub.add_parser("bench", help="benchmarks writing results/*.json and PNGs")
    b.add_argument("what", choices=["attention", "lra", "speed"],
                   help="attention: every mixer's time and memory vs length; lra: Long Range Arena (P29); speed: "
                   "formers against x-transformers and HF transformers on the same models")
    b.add_argument("args", nargs=argparse.REMAINDER, help="options of that benchmark (see --help after its name)")
    b.set_defaults(fn=_cmd_bench)

    from formers.papers.commands import add_parser as add_papers_parser

    add_papers_parser(sub)  # formers papers [list|show|verify|search|html|docs]
    return p


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    args.argv = argv  # `train --nproc N` runs the same command line in N processes
    # KEY=VALUE overrides may also come after options (`formers train R --out D train.steps=5`)
    if getattr(args, "cmd", None) == "train" and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.fn(args)
    except FormersError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `formers list | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
