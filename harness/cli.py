"""`harness train | sweep | report | export-nir`: the one place that parses argv.

Exit codes: 0 success; 2 bad input of any kind (config, search space, data, paths,
resources), with one line on stderr; 1 a failure while a run was under way; 130 an
interrupt (Ctrl-C).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import INTERRUPTED


def _version() -> str:
    from importlib import metadata
    try:
        return metadata.version("nq-snn-harness")
    except metadata.PackageNotFoundError:
        from . import __version__
        return __version__


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="harness", description="NQ / QCFS training, ANN->SNN conversion, "
                                "Ray Tune sweeps, MLflow tracking and paper tables.",
                                epilog="exit codes: 0 ok, 1 a run failed, 2 bad input, 130 interrupted")
    p.add_argument("--version", action="version", version=f"harness {_version()}")
    sub = p.add_subparsers(dest="command", metavar="{train,sweep,report,export-nir}")
    sub.required = True

    t = sub.add_parser("train", help="train one NQ/QCFS trial and evaluate its SNN",
                       description="Train one NQ/QCFS trial and evaluate its SNN.")
    t.add_argument("--config", help="YAML config (defaults: digits, cnn_small, NQ layerwise)")
    _add_set(t, "override a config key (repeatable), e.g. --set noise.mode=qcfs")
    t.add_argument("--out", help="output folder (default: runs/<data>-<arch>-<method>-seed<seed>); "
                                 "an existing checkpoint of the same config there is resumed")
    t.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    t.set_defaults(func=_train)

    s = sub.add_parser("sweep", help="run a search space of trials on Ray Tune, tracked in MLflow",
                       description="Run a search space of trials on Ray Tune, tracked in MLflow.")
    s.add_argument("space", help="search-space YAML (base config + grid + resources)")
    s.add_argument("--name", help="experiment name (default: the file's `name:` or its stem)")
    s.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///<cwd>/mlflow.db)")
    s.add_argument("--storage-path", help="Ray Tune results folder (default: <cwd>/ray_results)")
    s.add_argument("--address", help="join an existing Ray cluster (e.g. 'auto'); default: start a local one")
    s.add_argument("--resume", action="store_true",
                   help="continue an interrupted sweep (finished trials are not rerun; failed ones continue)")
    _add_set(s, "override a key of the base config (repeatable)")
    s.set_defaults(func=_sweep)

    r = sub.add_parser("report", help="tables and figures for one MLflow experiment (sweep)",
                       description="Tables (Markdown, LaTeX) and figures (PNG and PDF) for one MLflow "
                                   "experiment (sweep): its newest parent run, or --parent.")
    r.add_argument("--experiment", required=True, help="MLflow experiment (= sweep) name")
    r.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///<cwd>/mlflow.db)")
    r.add_argument("--out", help="output folder (default: reports/<experiment>/)")
    r.add_argument("--format", default="md,tex,png",
                   help="comma-separated subset of md,tex,png (default: all); png writes every figure as "
                        "PNG and as PDF; tex writes table1.tex, table1_delta.tex, table2.tex and preamble.tex")
    r.add_argument("--parent", metavar="RUN_ID",
                   help="report the trials of this parent run (default: the newest parent run)")
    r.add_argument("--per-trial", action="store_true",
                   help="also write per-trial figures (training curves, delta heatmap, residual histograms)")
    r.add_argument("--no-attach", action="store_true",
                   help="do not log the tables and index.md as artifacts of the parent run")
    r.add_argument("--jobs", type=_positive_int, metavar="N",
                   help="processes that draw the figures (default: the CPUs available, at most 8; "
                        "1 = none besides this one)")
    r.set_defaults(func=_report)

    n = sub.add_parser("export-nir", help="write the NIR graph of a finished run's converted SNN",
                       description="Write the NIR graph (nir.NIRGraph, HDF5) of a finished run's converted SNN: "
                                   "BN folded into the weights, IF nodes with v_threshold = lambda; the harness "
                                   "semantics (reset by subtraction, v(0) = theta/2, fire on >=) in the metadata.")
    n.add_argument("run_dir", help="a finished run (result.json and best.pt)")
    n.add_argument("out", help="the .nir file to write")
    n.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="weights and thresholds (default float32)")
    n.add_argument("--checkpoint", default="best.pt", help="checkpoint file in RUN_DIR (default best.pt)")
    n.set_defaults(func=_export_nir)
    return p


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1")
    return n


def _add_set(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE", help=help)


def _train(a: argparse.Namespace) -> int:
    from .config import load_config
    from .train import run

    cfg = load_config(a.config, a.overrides)
    out = Path(a.out or f"runs/{cfg.data.name}-{cfg.model.arch}-{cfg.method}-seed{cfg.train.seed}")
    res = run(cfg, out, progress=not a.quiet)
    accs = "  ".join(f"T={t}: {v:.2f}" for t, v in res["snn_test_acc"].items())
    print(f"{cfg.method} {cfg.model.arch} on {cfg.data.name}: best epoch {res['best_epoch']}, "
          f"ANN test {res['ann_test_acc']:.2f}  SNN test {accs}")
    print(f"results: {out.absolute() / 'result.json'}")
    return 0


def _sweep(a: argparse.Namespace) -> int:
    from .sweep import SweepOptions, main
    return main(SweepOptions(a.space, a.name, a.tracking_uri, a.storage_path, a.address, a.resume, a.overrides))


def _report(a: argparse.Namespace) -> int:
    from .report.cli import run
    print(run(a.experiment, a.tracking_uri, a.out, a.format, a.parent, a.per_trial, attach=not a.no_attach,
              jobs=a.jobs))
    return 0


def _export_nir(a: argparse.Namespace) -> int:
    from .nir_export import SEMANTICS, export_run
    g = export_run(a.run_dir, a.out, dtype=a.dtype, checkpoint=a.checkpoint)
    n_if = sum(1 for node in g.nodes.values() if type(node).__name__ == "IF")
    print(f"wrote {a.out}: {len(g.nodes)} nodes ({n_if} IF), {len(g.edges)} edges; semantics {SEMANTICS} "
          "(reset by subtraction, v(0) = theta/2, fire on >=: see the IF nodes' metadata)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        a = parser.parse_args(argv)
    except SystemExit as e:  # --help / --version: 0; a usage error: 2 (argparse printed it)
        return int(e.code or 0)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path.home() / ".cache" / "harness" / "inductor"))
    from .errors import HarnessError
    try:
        return a.func(a)
    except HarnessError as e:
        print(str(e), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
