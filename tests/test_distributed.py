"""Multi-node, on one machine, with Ray's own tools: a `ray.cluster_utils.Cluster` with a
head (0 CPUs, so no trial runs there) and 2 worker nodes of 1 CPU, joined by `harness
sweep --address` as a subprocess.

On one machine every node shares the disk and the IP; `ray.node_id` tells them apart. The
cluster is never advertised to other `ray.init()` calls on the machine (Cluster would
write /tmp/ray/ray_current_cluster, which any plain `ray.init()` then joins)."""
from pathlib import Path

import pytest

from sweeps import Harness, assert_complete, by_label, harness, runs, steps, tune_trials, wait_for, write_space

pytestmark = pytest.mark.slow

EPOCHS = 3


@pytest.fixture(scope="module")
def cluster():
    pytest.importorskip("ray")
    import ray._private.utils as ray_utils
    from ray.cluster_utils import Cluster
    advertise = ray_utils.write_ray_address
    ray_utils.write_ray_address = lambda *a, **k: None
    try:
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
        for _ in range(2):
            c.add_node(num_cpus=1)
        c.wait_for_nodes()
    finally:
        ray_utils.write_ray_address = advertise
    yield c
    c.shutdown()


def sweep_args(space: Path, cluster, uri: str, storage: str) -> list[str]:
    return ["sweep", str(space), "--address", cluster.address, "--tracking-uri", uri, "--storage-path", storage]


def test_node_local_storage_is_refused_on_a_cluster(cluster, tmp_path):
    """A plain folder on /tmp is node-local (/proc/mounts): refused at once, one line, exit
    2, before any MLflow run exists."""
    space = write_space(tmp_path, "local_store")
    rc, h = harness(sweep_args(space, cluster, f"sqlite:///{tmp_path}/m.db", str(tmp_path / "rr")), tmp_path,
                    tmp_path / "refused", timeout=300)
    err = [ln for ln in Path(f"{h.log}.err").read_text().splitlines() if ln.strip()]
    assert rc == 2, h.output()[-3000:]
    assert len(err) == 1, err
    assert err[0].startswith(f"sweep error: --storage-path {tmp_path / 'rr'} is on a node-local file system")
    assert "nodes (expected a shared mount such as NFS/EFS, or a URI" in err[0]
    assert not (tmp_path / "m.db").exists() and not (tmp_path / "rr").exists()


def test_cluster_sweep_survives_node_loss(cluster, tmp_path):
    """(1) A 2-trial sweep with file:// storage runs its trials on both worker nodes and tags
    each child run with its node. (2) The same sweep again; a worker node is removed while
    its trial runs (after epoch 1): the trial is retried on the surviving node from its
    last checkpoint, in the same MLflow child run, and every final metric equals (1)'s."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    storage = f"file://{tmp_path}/shared"
    workers = {n.node_id for n in cluster.worker_nodes}

    rc, h = harness(sweep_args(write_space(tmp_path, "ref", train={"epochs": EPOCHS}), cluster, uri, storage),
                    tmp_path, tmp_path / "ref")
    assert rc == 0, h.output()[-4000:]
    c, parents, children = runs(uri, "ref")
    ref = by_label(children)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED" and len(ref) == 2
    ref_finals = {label: assert_complete(c, r, EPOCHS) for label, r in ref.items()}
    assert {r.data.tags["ray.node_id"] for r in ref.values()} == workers  # both worker nodes ran one
    assert all(r.data.tags["ray.node_ip"] for r in ref.values())

    h = Harness(sweep_args(write_space(tmp_path, "loss", train={"epochs": EPOCHS}), cluster, uri, storage),
                tmp_path, tmp_path / "loss")

    def a_trial_past_epoch_1():
        c, _, children = runs(uri, "loss")
        for r in children:
            if r.info.status == "RUNNING" and steps(c, r.info.run_id, "train/loss") == [1] \
                    and r.data.tags.get("ray.node_id") in workers:
                return r.data.tags["harness.trial"], r.data.tags["ray.node_id"]

    label, lost = wait_for(a_trial_past_epoch_1, "a trial that logged epoch 1 and not epoch 2", h, every=0.5)
    victim, = [n for n in cluster.worker_nodes if n.node_id == lost]
    cluster.remove_node(victim, allow_graceful=False)
    rc = h.wait()
    cluster.add_node(num_cpus=1)  # the fixture's shape for any later test
    assert rc == 0, h.output()[-4000:]
    assert "2/2 trials finished" in h.stdout()

    c, parents, children = runs(uri, "loss")
    loss = by_label(children)  # no duplicate run
    assert len(parents) == 1 and parents[0].info.status == "FINISHED" and len(loss) == 2
    finals = {lbl: assert_complete(c, r, EPOCHS) for lbl, r in loss.items()}  # no run left RUNNING
    assert finals == ref_finals  # exactly: CPU training is deterministic and a restore restores the RNG
    survivor = loss[label].data.tags["ray.node_id"]
    assert survivor != lost and survivor in workers  # retried on the surviving node

    trials = tune_trials(f"{tmp_path}/shared/loss")
    retried, other = trials[label], next(t for lbl, t in trials.items() if lbl != label)
    assert retried.run_metadata.num_failures == 1 and other.run_metadata.num_failures == 0
    last = retried.last_result  # restored from its checkpoint, not restarted from scratch
    assert last["training_iteration"] == EPOCHS + 1 and last["iterations_since_restore"] < EPOCHS + 1, last
