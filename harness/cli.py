"""`harness train | sweep | report`. Expected failures print one line and exit non-zero."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _train(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="harness train", description="Train one NQ/QCFS trial and evaluate its SNN.")
    p.add_argument("--config", help="YAML config (defaults: digits, cnn_small, NQ layerwise)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config key (repeatable), e.g. --set noise.mode=qcfs")
    p.add_argument("--out", help="output folder (default: runs/<data>-<arch>-<method>-seed<seed>); "
                                 "an existing checkpoint there is resumed")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    a = p.parse_args(argv)
    from .config import load_config
    cfg = load_config(a.config, a.overrides)
    out = Path(a.out or f"runs/{cfg.data.name}-{cfg.model.arch}-{cfg.method}-seed{cfg.train.seed}")
    from .train import run
    res = run(cfg, out, progress=not a.quiet)
    accs = "  ".join(f"T={t}: {v:.2f}" for t, v in res["snn_test_acc"].items())
    print(f"{cfg.method} {cfg.model.arch} on {cfg.data.name}: best epoch {res['best_epoch']}, "
          f"ANN test {res['ann_test_acc']:.2f}  SNN test {accs}")
    print(f"results: {out.absolute() / 'result.json'}")
    return 0


def _sweep(argv: list[str]) -> int:
    from .sweep import main
    return main(argv)


def _report(argv: list[str]) -> int:
    from .report.cli import main
    return main(argv)


COMMANDS = {"train": _train, "sweep": _sweep, "report": _report}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print("usage: harness {train,sweep,report} ... (see harness <command> --help)", file=sys.stderr)
        return 2
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path.home() / ".cache" / "harness" / "inductor"))
    from .errors import INTERRUPTED, HarnessError
    try:
        return COMMANDS[argv[0]](argv[1:])
    except HarnessError as e:
        print(str(e), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
