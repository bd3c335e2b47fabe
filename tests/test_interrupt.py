"""Ctrl-C: a sweep never claims success it did not have.

`harness sweep` runs as a subprocess (its own local Ray, 2 CPUs) on a 4-trial digits space
(noise.mode x train.seed; one seed's trials 8 epochs, the other's 2), 2 trials at a time, and gets SIGINT (1) after its
first 2 trials FINISHED in MLflow, while the other 2 run; (2) while its first 2 trials run.
Each time: exit 130, parent KILLED, the counts and the --resume command printed, no child
run left RUNNING; `harness report` names the trials that did not finish above its tables;
`--resume` then finishes the rest in the same parent and child runs."""
import re

import pytest

from harness.cli import main as harness_main
from sweeps import assert_complete, by_label, harness, runs, steps, tune_trials, wait_for, write_space, Harness

EPOCHS, LONG = 2, 8  # the trials of one seed run LONG epochs: the interrupt lands while they run
GRID = {"noise.mode": ["layerwise", "qcfs"], "train.seed": [0, 1]}  # Tune runs seed 0's trials first

pytestmark = pytest.mark.slow


def epochs_of(label: str, long_seed: int) -> int:
    return LONG if label.endswith(f"seed={long_seed}") else EPOCHS


def setup(tmp_path, name, storage, long_seed: int):
    space = write_space(tmp_path, name, grid=GRID, calibration={"mode": "local"},
                        overrides=[{"match": {"train.seed": long_seed}, "set": {"train.epochs": LONG}}])
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = ["sweep", str(space), "--tracking-uri", uri, "--storage-path", storage]
    return space, uri, args


def status_of(uri, name):
    c, parents, children = runs(uri, name)
    return {r.data.tags["harness.trial"]: r.info.status for r in children}


def check_interrupted(h, rc, uri, name, finished: int, space, storage):
    out = h.stdout()
    assert rc == 130, h.output()[-4000:]
    assert f"sweep {name}: INTERRUPTED after" in out, out[-2000:]
    assert f"{finished} finished, 0 failed, {4 - finished} not finished, of 4" in out
    # the command that continues it, with the store and storage it ran with
    assert f"`harness sweep {space} --name {name} --tracking-uri {uri} --storage-path {storage} --resume`" in out
    c, parents, children = runs(uri, name)
    assert len(parents) == 1 and parents[0].info.status == "KILLED"
    status = {r.data.tags["harness.trial"]: r.info.status for r in children}
    assert "RUNNING" not in status.values(), status
    assert list(status.values()).count("FINISHED") == finished, status
    return c, parents[0], by_label(children)


def check_resumed(tmp_path, uri, name, args, parent_id, storage_exp, long_seed):
    rc, h = harness(args + ["--resume"], tmp_path, tmp_path / f"{name}-resume")
    assert rc == 0, h.output()[-4000:]
    assert "4/4 trials finished" in h.stdout()
    c, parents, children = runs(uri, name)
    assert [p.info.run_id for p in parents] == [parent_id] and parents[0].info.status == "FINISHED"
    kids = by_label(children)  # one run per trial: nothing duplicated
    assert len(kids) == 4
    finals = {label: assert_complete(c, r, epochs_of(label, long_seed)) for label, r in kids.items()}
    trials = tune_trials(storage_exp)
    assert sorted(trials) == sorted(kids)
    assert all(t.status == "TERMINATED" and t.last_result["final"] for t in trials.values())
    return c, kids, finals, trials


def test_sigint_after_two_finished_then_report_and_resume(tmp_path):
    name = "int_after2"
    storage = str(tmp_path / "ray_results")
    space, uri, args = setup(tmp_path, name, storage, long_seed=1)
    h = Harness(args, tmp_path, tmp_path / name)

    def two_done_two_running():
        s = status_of(uri, name)
        return len(s) == 4 and list(s.values()).count("FINISHED") == 2 and list(s.values()).count("RUNNING") == 2

    wait_for(two_done_two_running, "2 trials FINISHED and 2 RUNNING", h)
    h.interrupt()
    rc = h.wait()
    c, parent, kids = check_interrupted(h, rc, uri, name, 2, space, storage)
    killed = sorted(label for label, r in kids.items() if r.info.status == "KILLED")
    done = sorted(label for label, r in kids.items() if r.info.status == "FINISHED")
    assert len(killed) == 2 and len(done) == 2
    end_times = {label: kids[label].info.end_time for label in done}

    # harness report on the interrupted experiment: the trials that did not finish are
    # named above the tables, with the n of their cells
    out = tmp_path / "report"
    assert harness_main(["report", "--experiment", name, "--tracking-uri", uri, "--out", str(out), "--format", "md"]) == 0
    index = (out / "index.md").read_text()
    head = index[:index.index("## Table 1")]
    assert "## Trials not reported" in head
    lines = [ln for ln in head.splitlines() if ln.startswith("- `")]
    assert sorted(re.match(r"- `([^`]+)`", ln).group(1) for ln in lines) == killed
    method = {"layerwise": "NQ", "qcfs": "QCFS"}
    for ln in lines:
        label = re.match(r"- `([^`]+)`", ln).group(1)
        mode = label.split(",")[0].split("=")[1]
        n_done = sum(1 for d in done if d.startswith(f"mode={mode},"))
        assert "**KILLED**" in ln and f", {method[mode]}" in ln, ln
        assert f"n = {n_done} of the 2 trials of this cell that started" in ln, ln

    c, kids2, finals, trials = check_resumed(tmp_path, uri, name, args, parent.info.run_id, f"{storage}/{name}", 1)
    assert {label: r.info.run_id for label, r in kids2.items()} == {label: r.info.run_id for label, r in kids.items()}
    assert {label: kids2[label].info.end_time for label in done} == end_times  # not rerun


def test_sigint_while_two_run_then_resume_from_uri(tmp_path):
    """The storage is a pyarrow URI (file://): the interrupted trials continue from their
    epoch-1 checkpoints there, in their own MLflow runs."""
    name = "int_running"
    storage = f"file://{tmp_path}/rr_uri"
    space, uri, args = setup(tmp_path, name, storage, long_seed=0)
    h = Harness(args, tmp_path, tmp_path / name)

    def two_running_none_finished():
        c, _, children = runs(uri, name)
        running = [r for r in children if r.info.status == "RUNNING"]
        return (len(running) == 2 and len(children) == 2
                and all(steps(c, r.info.run_id, "train/loss")[:1] == [1] for r in running))

    wait_for(two_running_none_finished, "the first 2 trials RUNNING past epoch 1", h, every=0.5)
    h.interrupt()
    rc = h.wait()
    c, parent, kids = check_interrupted(h, rc, uri, name, 0, space, storage)
    assert sorted(r.info.status for r in kids.values()) == ["KILLED", "KILLED"]  # the other 2 never started
    started = sorted(kids)

    c, kids2, finals, trials = check_resumed(tmp_path, uri, name, args, parent.info.run_id,
                                             f"{storage}/{name}", 0)
    for label in started:
        assert kids2[label].info.run_id == kids[label].info.run_id  # continued its own run
        # Tune restored it from a checkpoint: it reported fewer times since than in all
        last = trials[label].last_result
        assert last["iterations_since_restore"] < last["training_iteration"] == LONG + 1, last
