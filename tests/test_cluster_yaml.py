"""ray_cluster.yaml is a valid Ray cluster-launcher config, checked offline.

`prepare_config` only merges the AWS provider defaults (ray/autoscaler/aws/defaults.yaml)
and fills per-node-type worker counts; it does not contact AWS (that is
`bootstrap_config`, run by `ray up`). `validate_config` checks the result against
ray-schema.json, whose objects forbid unknown keys.
"""
import copy
from pathlib import Path

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")
util = pytest.importorskip("ray.autoscaler._private.util")

PATH = Path(__file__).resolve().parent.parent / "ray_cluster.yaml"


@pytest.fixture()
def cluster():
    return yaml.safe_load(PATH.read_text())


def validate(cfg):
    util.validate_config(util.prepare_config(copy.deepcopy(cfg)))


def test_cluster_yaml_is_valid(cluster):
    validate(cluster)
    nodes = cluster["available_node_types"]
    head = nodes[cluster["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # no trials on the head
    workers = [n for k, n in nodes.items() if k != cluster["head_node_type"]]
    assert workers and all(n["resources"].get("GPU", 0) >= 1 for n in workers)
    assert all(n["node_config"]["InstanceMarketOptions"] == {"MarketType": "spot"} for n in workers)
    assert all(n.get("min_workers", 0) == 0 for n in workers)
    docker = cluster["docker"]
    assert docker["image"] == "rayproject/ray:2.60.0-py311-gpu"
    assert "--shm-size=16g" in docker["run_options"]
    assert any("pip install" in c and "-e" in c for c in cluster["setup_commands"])
    assert cluster["idle_timeout_minutes"] > 0 and cluster["max_workers"] >= 1


@pytest.mark.parametrize("mutate", [
    lambda c: c.__setitem__("max_wrokers", c.pop("max_workers")),            # misspelled top-level key
    lambda c: c["docker"].__setitem__("imagee", "rayproject/ray:2.60.0"),    # unknown docker key
    lambda c: c.__setitem__("head_node_type", "nope"),                       # not a node type
])
def test_misspelled_keys_fail(cluster, mutate):
    mutate(cluster)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        validate(cluster)


def test_shared_state_is_on_the_shared_file_system(cluster):
    """Checkpoints, MLflow (runs and artifacts) and the data root are on /mnt/shared, which every
    host mounts and every container sees; the header says so for --storage-path."""
    shared = "/mnt/shared"
    assert any(shared in c and "mount" in c for c in cluster["initialization_commands"])
    assert f"-v {shared}:{shared}" in cluster["docker"]["run_options"]
    (server,) = [c for c in cluster["head_start_ray_commands"] if "mlflow server" in c]
    assert f"--backend-store-uri sqlite:///{shared}/" in server
    assert "--serve-artifacts" in server and f"--artifacts-destination {shared}/" in server
    assert any(f"HARNESS_CACHE={shared}/" in c for c in cluster["setup_commands"])
    header = PATH.read_text().split("cluster_name:")[0]
    assert f"--storage-path {shared}/ray_results" in header and '--tracking-uri "$MLFLOW_TRACKING_URI"' in header
