"""Accuracy per unit of compute, from a finished sweep tracked in MLflow.

SNN accuracy at each T against the dense compute it costs, T x MACs per image (every
step runs every layer densely, as `simulate` does), for each method (QCFS, NQ), one
table per dataset and architecture. Read from the FINISHED child runs (trials) of one
parent run (sweep) of an MLflow experiment: each trial's `result.json` artifact, or,
where a trial has none, its `final/*` metrics (MACs then computed from `model.arch` at
the dataset's image size).

    python benchmarks/accuracy_compute.py [--tracking-uri URI] [--experiment NAME] [--parent RUN_ID]

Defaults: the store `sqlite:///<repository>/mlflow.db` (what `harness sweep` run from the
repository root writes), the experiment `cpu_cifar10`, and its newest parent run.
"""
from __future__ import annotations

import json
import os
import re
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import ROOT, parser, section

TITLE = "Accuracy per unit of compute"
DEFAULT_EXPERIMENT = "cpu_cifar10"
_T_METRIC = re.compile(r"^final/snn_test_acc_T(\d+)$")
_IMAGE = {"cifar10": (3, 32, 32, 10), "cifar100": (3, 32, 32, 100), "digits": (1, 8, 8, 10)}


class NoData(Exception):
    """Nothing to tabulate; str() says why (shown in the report instead of a table)."""

    def __init__(self, msg: str, parent: str | None = None):
        super().__init__(msg)
        self.parent = parent


def default_tracking_uri() -> str:
    return f"sqlite:///{(ROOT / 'mlflow.db').as_posix()}"


def _client(uri: str):
    import logging

    from harness.tracking import normalize_uri

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = normalize_uri(uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        raise NoData(f"No MLflow store at `{uri[len('sqlite:///'):]}` (run the sweep first, or pass "
                     "`--tracking-uri`).")
    from mlflow.tracking import MlflowClient

    return uri, MlflowClient(tracking_uri=uri)


def _all_runs(client, exp_id: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([exp_id], max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def select_trials(client, experiment: str, parent: str | None = None) -> tuple[str, list, list, list[str]]:
    """(parent run id, its FINISHED child runs, its other child runs, all parent ids newest
    first). Parent runs: tagged harness.role=parent, or named by a child's mlflow.parentRunId."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise NoData(f"No experiment `{experiment}` in the store (experiments: {', '.join(names) or 'none'}).")
    runs = _all_runs(client, exp.experiment_id)
    by_id = {r.info.run_id: r for r in runs}
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")
                and r.data.tags.get("harness.role") != "parent"]
    ids = {r.info.run_id for r in runs if r.data.tags.get("harness.role") == "parent"}
    ids |= {r.data.tags["mlflow.parentRunId"] for r in children}

    def started(pid: str) -> int:
        if pid in by_id:
            return by_id[pid].info.start_time or 0
        return min((r.info.start_time or 0 for r in children if r.data.tags["mlflow.parentRunId"] == pid),
                   default=0)

    order = sorted(ids, key=lambda p: (-started(p), p))
    if not order:
        raise NoData(f"Experiment `{experiment}` has no parent run (sweep).")
    if parent is not None and parent not in ids:
        raise NoData(f"No parent run `{parent}` in experiment `{experiment}` (newest first: {', '.join(order)}).")
    pid = parent or order[0]
    kids = [r for r in children if r.data.tags["mlflow.parentRunId"] == pid]
    return (pid, [r for r in kids if r.info.status == "FINISHED"],
            [r for r in kids if r.info.status != "FINISHED"], order)


def _result_json(client, run_id: str) -> dict | None:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            return json.loads(Path(client.download_artifacts(run_id, "result.json", tmp)).read_text())
        except Exception:  # noqa: BLE001 - no artifact, unreadable: fall back to the metrics
            return None


_MACS: dict = {}


def _macs_for(arch: str, data: str) -> int:
    """MACs of one inference of `arch` at the dataset's image size (CIFAR size if unknown)."""
    key = (arch, data)
    if key not in _MACS:
        import harness
        from harness.train import count_macs

        c, h, w, k = _IMAGE.get(data, _IMAGE["cifar10"])
        _MACS[key] = count_macs(harness.create_model(arch, num_classes=k, in_chans=c), (c, h, w))
    return _MACS[key]


def trial_record(client, run) -> dict:
    """{method, arch, data, macs, ann, snn: {T: acc}, source} of one finished trial."""
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    res = _result_json(client, run.info.run_id)
    if res is not None:
        cfg = res.get("config", {})
        return dict(method=res["method"], arch=cfg.get("model", {}).get("arch", params.get("model.arch", "?")),
                    data=cfg.get("data", {}).get("name", params.get("data.name", "?")), macs=int(res["macs"]),
                    ann=float(res["ann_test_acc"]), snn={int(t): float(a) for t, a in res["snn_test_acc"].items()},
                    source="result.json")
    snn = {int(m.group(1)): float(v) for k, v in metrics.items() if (m := _T_METRIC.match(k))}
    if "final/ann_test_acc" not in metrics or not snn:
        raise NoData(f"trial run {run.info.run_id} is FINISHED but has neither result.json nor final/ metrics")
    arch, data = params.get("model.arch", "?"), params.get("data.name", "?")
    return dict(method=tags.get("harness.method", "?"), arch=arch, data=data, macs=_macs_for(arch, data),
                ann=float(metrics["final/ann_test_acc"]), snn=snn, source="metrics")


def _method_key(m: str) -> tuple:
    return (0 if m == "QCFS" else 1 if m.startswith("NQ") else 2, m)


def tables(records: list[dict]) -> str:
    def cell(v):
        return f"{statistics.mean(v):.2f}" + (f" ± {statistics.stdev(v):.2f}" if len(v) > 1 else "") \
            + f" (n={len(v)})"

    groups = defaultdict(list)
    for r in records:
        groups[(r["data"], r["arch"])].append(r)
    out = []
    for (data, arch), recs in sorted(groups.items()):
        macs = {r["macs"] for r in recs}
        m = max(macs)
        methods = sorted({r["method"] for r in recs}, key=_method_key)
        Ts = sorted({t for r in recs for t in r["snn"]})
        acc = {k: {t: [r["snn"][t] for r in recs if r["method"] == k and t in r["snn"]] for t in Ts} for k in methods}
        ann = {k: [r["ann"] for r in recs if r["method"] == k] for k in methods}
        lines = [f"**{arch} on {data}**: MACs per image (one ANN inference) = {m / 1e6:.2f} M"
                 + ("" if len(macs) == 1 else f" (trials disagree: {sorted(macs)}; the largest is used)")
                 + ". Mean ± sample std over trials (seeds).", "",
                 "| T | steps × MACs (M) | " + " | ".join(f"{k} SNN test acc (%)" for k in methods) + " |",
                 "|---|---|" + "---|" * len(methods),
                 "| ANN | " + f"{m / 1e6:.1f} | " + " | ".join(cell(ann[k]) if ann[k] else "—" for k in methods) + " |"]
        lines += [f"| {t} | {t * m / 1e6:.1f} | " + " | ".join(cell(acc[k][t]) if acc[k][t] else "—"
                                                              for k in methods) + " |" for t in Ts]
        out.append("\n".join(lines))
    return "\n\n".join(out)


def report(tracking_uri: str | None = None, experiment: str = DEFAULT_EXPERIMENT,
           parent: str | None = None) -> tuple[str, str | None]:
    """(Markdown body, the parent run id used or None)."""
    try:
        uri, client = _client(tracking_uri or default_tracking_uri())
        pid, finished, others, order = select_trials(client, experiment, parent)
        if not finished:
            raise NoData(f"Parent run `{pid}` of experiment `{experiment}` has no FINISHED trial yet "
                         f"({len(others)} other trial run(s)).", pid)
        records = [trial_record(client, r) for r in finished]
    except NoData as e:
        return str(e), e.parent
    status = defaultdict(int)
    for r in others:
        status[r.info.status] += 1
    src = defaultdict(int)
    for r in records:
        src[r["source"]] += 1
    which = "given with `--parent`" if parent else f"the newest of {len(order)} parent run(s)"
    head = (f"{len(records)} FINISHED trial(s) of parent run `{pid}` ({which}) in experiment `{experiment}`, "
            f"store `{uri}`"
            + (f"; left out, not finished: {', '.join(f'{n} {s}' for s, n in sorted(status.items()))}" if others else "")
            + f". Read from {', '.join(f'{n} × {s}' for s, n in sorted(src.items()))}.")
    return head + "\n\n" + tables(records), pid


def command(tracking_uri: str | None, experiment: str, parent: str | None) -> str:
    cmd = ["python", "benchmarks/accuracy_compute.py"]
    if tracking_uri:
        cmd += ["--tracking-uri", tracking_uri]
    cmd += ["--experiment", experiment]
    if parent:
        cmd += ["--parent", parent]
    return " ".join(cmd)


def run(quick: bool = False, threads: int = 2, tracking_uri: str | None = None,
        experiment: str = DEFAULT_EXPERIMENT, parent: str | None = None) -> str:
    """`quick` and `threads` are accepted for run_all's sake and change nothing here."""
    body, pid = report(tracking_uri, experiment, parent)
    # name the parent run that was read, so the command reproduces this table after newer sweeps
    return section(TITLE, command(tracking_uri, experiment, parent or pid), body)


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store (default: sqlite:///<repository>/mlflow.db)")
    p.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help=f"experiment (default {DEFAULT_EXPERIMENT})")
    p.add_argument("--parent", default=None, help="parent run id (default: the newest parent run)")
    a = p.parse_args(argv)
    print(run(a.quick, a.threads, a.tracking_uri, a.experiment, a.parent))


if __name__ == "__main__":
    main()
