"""cluster.yaml checked offline, and a sweep on a real multi-node Ray with a real MLflow server.

The multi-node cluster is ``ray.cluster_utils.Cluster`` on this machine: a head node (trial
drivers only) and two worker nodes that carry a custom ``trainer`` resource, so every training
worker must run on a worker node. The MLflow server is a real ``mlflow server`` process on
127.0.0.1; the test reads back which Ray node trained each trial.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import yaml
from conftest import scratch_ray_env

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"


def _cluster_config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_passes_ray_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = _cluster_config()
    validate_config(cfg)
    prepared = prepare_config(cfg)
    validate_config(prepared)
    assert prepared["head_node_type"] == "ray.head.default"
    workers = [v for k, v in prepared["available_node_types"].items() if k != "ray.head.default"]
    assert workers and all(w["resources"].get("GPU", 0) >= 1 for w in workers)
    assert all(w.get("min_workers", 0) == 0 for w in workers), "GPU workers scale from 0"


def test_cluster_yaml_opens_only_ssh_to_the_internet():
    rules = _cluster_config()["provider"]["security_group"]["IpPermissions"]
    assert [(r["FromPort"], r["ToPort"], r["IpProtocol"]) for r in rules] == [(22, 22, "tcp")]


def _mlflow_command() -> str:
    cmds = _cluster_config()["head_start_ray_commands"]
    found = [c for c in cmds if "iceaggr mlflow-server" in c]
    assert len(found) == 1, cmds
    return found[0]


def test_mlflow_port_matches_readme_and_sweep_docs():
    port = re.search(r"--port[ =](\d+)", _mlflow_command()).group(1)
    readme = (REPO / "README.md").read_text()
    assert f"-L {port}:$HEAD_PRIVATE_IP:{port}" in readme  # the SSH tunnel to the UI
    assert f"http://127.0.0.1:{port}" in readme
    # The error message that points users at the head's server names the same port.
    from iceaggr_tune import cluster

    assert f":{port}" in Path(cluster.__file__).read_text()
    # The dashboard stays on localhost; only SSH tunnels reach it.
    start = " ".join(_cluster_config()["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start


def _lock_module():
    """``scripts/lock.py``, the one place that derives the cluster's pins from the lock."""
    spec = importlib.util.spec_from_file_location("lock", REPO / "scripts" / "lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cluster_installs_this_version_with_the_locked_dependencies():
    cfg = _cluster_config()
    assert cfg["file_mounts"]["~/iceaggr-tune"] == "."
    setup = " ".join(cfg["setup_commands"])
    assert "-c ~/iceaggr-tune/cluster/constraints.txt" in setup
    assert "-e ~/iceaggr-tune" in setup
    lock = _lock_module()
    # cluster/constraints.txt is exactly what scripts/lock.py derives from the lock.
    assert lock.CONSTRAINTS.read_text() == lock.expected_constraints(), "run `make lock`"
    pins = lock.pins(lock.CONSTRAINTS.read_text())
    locked = lock.pins(lock.LOCK.read_text())
    assert {k: v for k, v in pins.items() if k in locked} == locked
    assert pins["iceaggr-tune"] == lock.project_version(lock.PYPROJECT.read_text())
    assert pins["torch"] == lock.pins(lock.TORCH.read_text())["torch"]
    image = cfg["docker"]["image"]
    assert f"ray:{pins['ray']}" in image and "gpu" in image


def test_constraints_derivation_is_exact():
    lock = _lock_module()
    text = lock.constraints_text(
        "b==2.0\n    # via a\nA-Pkg==1.0 ; python_version >= '3.10'\n# torch\n",
        "# comment\ntorch==9.9.9\n",
        "0.3.0",
    )
    assert [line for line in text.splitlines() if not line.startswith("#")] == [
        "iceaggr-tune==0.3.0",
        "torch==9.9.9",
        "a-pkg==1.0",
        "b==2.0",
    ]
    with pytest.raises(ValueError, match="must pin exactly torch"):
        lock.constraints_text("a==1\n", "numpy==2.0\n", "0.1.0")


def test_lock_leaves_out_torch_and_cuda_libraries():
    """Installing the lock on a laptop never pulls a CUDA build or its libraries."""
    locked = _lock_module().pins((REPO / "requirements" / "lock.txt").read_text())
    assert "torch" not in locked
    assert not [n for n in locked if n.startswith(("nvidia-", "triton"))], sorted(locked)
    for tool in ("pytest", "ruff", "pip-tools", "ray", "optuna", "mlflow"):
        assert tool in locked, f"{tool} is not pinned in requirements/lock.txt"


def test_this_environment_was_installed_from_the_lock():
    """The tests, linters and sweep run with the locked versions (make installs them), and the
    ranges that pyproject.toml declares for library users admit every one of them."""
    from importlib import metadata

    from packaging.requirements import Requirement

    lock = _lock_module()
    locked = lock.pins(lock.LOCK.read_text())
    installed = {n: metadata.version(n) for n in locked if _installed(n)}
    wrong = {n: (v, installed.get(n)) for n, v in locked.items() if installed.get(n) != v}
    assert not wrong, f"not the locked versions (locked, installed): {wrong}; run `make venv`"
    torch_pin = lock.pins(lock.TORCH.read_text())["torch"]
    assert metadata.version("torch").split("+")[0] == torch_pin
    for spec in metadata.requires("iceaggr-tune") or []:
        req = Requirement(spec)
        version = torch_pin if req.name == "torch" else locked[req.name.lower()]
        assert req.specifier.contains(version, prereleases=True), (req, version)


def _installed(name: str) -> bool:
    from importlib import metadata

    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        return False
    return True


# ---------------------------------------------------------------- a real multi-node sweep


@pytest.fixture(scope="module")
def multinode(tmp_path_factory):
    """Head + two worker nodes, with Ray's token authentication on (as cluster.yaml has it)."""
    import secrets

    import ray
    from ray.cluster_utils import Cluster

    with scratch_ray_env(tmp_path_factory.mktemp("home"), token=secrets.token_hex(32)):
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        workers = [cluster.add_node(num_cpus=2, resources={"trainer": 1}) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        yield cluster, [w.node_id for w in workers]
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def cluster_data(tmp_path_factory) -> Path:
    from iceaggr.data.synth import write_synthetic_dataset

    path = tmp_path_factory.mktemp("data") / "synthetic"
    write_synthetic_dataset(path, n_events=1_500, batch_size=500, seed=5, progress=False)
    return path


@pytest.mark.slow
def test_multinode_rejects_node_local_tracking(multinode, cluster_data, tmp_path):
    from iceaggr_tune.cluster import ClusterConfigError, check_cluster_storage

    with pytest.raises(ClusterConfigError, match=r"--tracking-uri .*3 nodes.*http://<head-ip>"):
        check_cluster_storage(f"sqlite:///{tmp_path / 'x.db'}", str(tmp_path / "sweeps"))


@pytest.mark.slow
def test_storage_probe_runs_on_every_node(multinode, tmp_path):
    from iceaggr_tune.cluster import alive_nodes, nodes_missing_path

    nodes = alive_nodes()
    assert len(nodes) == 3
    marker = tmp_path / "marker"
    assert len(nodes_missing_path(marker, nodes)) == 3  # absent: every node says so
    marker.write_text("x")
    assert nodes_missing_path(marker, nodes) == []  # one filesystem here: all see it


@pytest.mark.slow
def test_multinode_sweep_logs_every_node_to_the_server(
    multinode, mlflow_server, cluster_data, tmp_path
):
    from mlflow.tracking import MlflowClient

    from iceaggr_tune.mlflow_runs import TAG_WORKER_NODE, child_runs
    from iceaggr_tune.sweep import SweepOptions, run_sweep

    _, worker_node_ids = multinode
    opts = SweepOptions.smoke().changed(
        {
            "name": "multinode",
            "data.path": str(cluster_data),
            "storage_path": str(tmp_path / "shared-sweeps"),
            "tracking.uri": mlflow_server.url,
            "resources.worker_resources": {"trainer": 1},
            "table.lrs": (1e-4, 1e-3),
            "search.trials": 2,
        }
    )
    result = run_sweep(opts)
    assert not result.interrupted
    runs = child_runs(mlflow_server.url, result.parent_run_id)
    assert len(runs) == 4 + 2
    client = MlflowClient(tracking_uri=mlflow_server.url)
    trained_on = {}
    for r in runs:
        assert r.info.status in ("FINISHED", "FAILED")
        assert client.get_metric_history(r.info.run_id, "loss"), r.info.run_name
        trained_on[r.info.run_name] = r.data.tags[TAG_WORKER_NODE]
    print("\ntrial -> node that trained it:")
    for name, node in sorted(trained_on.items()):
        print(f"  {name}: {node[:12]} (worker {worker_node_ids.index(node) + 1})")
    assert set(trained_on.values()) == set(worker_node_ids), "both worker nodes trained trials"
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert "stability_table.md" in artifacts  # uploaded through the server


def _uncommented_keys(text: str) -> list[str]:
    """Keys of block mappings with neither a comment line right above nor one on their line
    (keys inside list items, and the entries of file_mounts, are described by their parent's
    comment)."""
    lines = text.splitlines()
    missing, item_indent, parent_mounts = [], None, None
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        indent = len(line) - len(line.lstrip())
        if item_indent is not None and indent <= item_indent and not stripped.startswith("- "):
            item_indent = None
        if stripped.startswith("- "):
            item_indent = indent if item_indent is None else min(item_indent, indent)
            continue
        if item_indent is not None and indent > item_indent:
            continue
        if parent_mounts is not None and indent > parent_mounts:
            continue
        parent_mounts = indent if stripped.startswith("file_mounts:") else None
        if ":" not in stripped or "#" in line:
            continue
        above = next((p.strip() for p in reversed(lines[:i]) if p.strip()), "")
        if not above.startswith("#"):
            missing.append(f"line {i + 1}: {stripped}")
    return missing


def test_every_cluster_yaml_key_has_a_comment():
    assert _uncommented_keys(CLUSTER_YAML.read_text()) == []
    # The check itself finds a key without one.
    assert _uncommented_keys("# a\ncluster_name: x\nmax_workers: 2\n") == ["line 3: max_workers: 2"]


def test_cluster_yaml_reads_data_with_the_instance_role_and_no_keys():
    cfg = _cluster_config()
    workers = cfg["available_node_types"]["ray.worker.gpu"]["node_config"]
    profile = workers["IamInstanceProfile"]
    assert set(profile) <= {"Name", "Arn"} and all(profile.values())
    assert "**/data" in cfg["rsync_exclude"]  # data comes from S3, not through rsync
    for path in (CLUSTER_YAML, REPO / "cluster-onprem.yaml"):
        text = path.read_text()
        for word in ("AWS_ACCESS_KEY_ID=", "AWS_SECRET_ACCESS_KEY=", "aws_secret_access_key"):
            assert word not in text, f"{path.name} sets {word}: credentials come from the role"
    readme = (REPO / "README.md").read_text()
    cluster_part = readme.split("## On a GPU cluster", 1)[1].split("\n## ", 1)[0]
    assert "aws s3 sync" in cluster_part and "--data s3://" in cluster_part
    assert "/home/ray/data" not in cluster_part  # nothing puts data there on a new node
    onprem = (REPO / "cluster-onprem.yaml").read_text()
    assert "AWS_ENDPOINT_URL" in onprem and "--data /shared/" in onprem
