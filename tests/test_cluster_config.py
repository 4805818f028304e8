"""Cluster mode without a cluster: the YAMLs in cluster/, the runtime env, addresses, resource fit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from orchestrator.errors import JobSpecError
from orchestrator.launch.cluster_client import ClusterError, auth_headers, dashboard_url, shortfall
from orchestrator.launch.submit import CREDENTIALS_FILE, build_runtime_env, check_cluster_storage, entrypoint, load_runtime_env
from orchestrator.plan import cluster_needs, worker_resources
from orchestrator.spec import load_spec, validate_spec

CLUSTER = REPO / "cluster"


def _launcher(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


@pytest.mark.parametrize("name, provider", [("aws.yaml", "aws"), ("gcp.yaml", "gcp")])
def test_launcher_yamls_define_cpu_head_and_autoscaling_gpu_workers_that_install_this_package(name, provider):
    config = _launcher(name)
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands", "file_mounts"):
        assert key in config, f"{name}: {key} missing"
    assert config["provider"]["type"] == provider
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    gpu_types = [t for n, t in types.items() if n != config["head_node_type"]]
    assert gpu_types and all(t["min_workers"] < t["max_workers"] for t in gpu_types)
    assert config["max_workers"] >= max(t["max_workers"] for t in gpu_types)
    # The package is this checkout, copied to every node and pip-installed there.
    mount = next(target for target, source in config["file_mounts"].items() if source == ".")
    assert any("pip install" in c and mount in c for c in config["setup_commands"])
    assert all("RAY_AUTH_MODE=token" in c for c in config["head_start_ray_commands"][1:] + config["worker_start_ray_commands"][1:])
    assert "2.60" in config["docker"]["image"]


def _documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def test_kuberay_raycluster_has_gpu_worker_group_token_auth_and_the_package_image():
    (cluster,) = _documents(CLUSTER / "kuberay" / "raycluster.yaml")
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    _check_ray_cluster_spec(cluster["spec"])


def _check_ray_cluster_spec(spec: dict) -> None:
    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for container in (c for t in templates for c in _containers(t)):
        assert "orchestrator" in container["image"]
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token" and "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]
    gpus = [int(c["resources"]["limits"]["nvidia.com/gpu"]) for g in spec["workerGroupSpecs"] for c in _containers(g["template"])]
    assert gpus and all(n >= 1 for n in gpus)
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_kuberay_rayjob_runs_orchestrator_on_a_job_spec_from_its_configmap_that_validates():
    docs = _documents(CLUSTER / "kuberay" / "rayjob.yaml")
    config_map = next(d for d in docs if d["kind"] == "ConfigMap")
    job = next(d for d in docs if d["kind"] == "RayJob")
    command = job["spec"]["entrypoint"].split()
    assert command[:4] == ["python", "-m", "orchestrator", "run"]
    spec_path = Path(command[4])
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    mount = next(m for c in _containers(head) for m in c["volumeMounts"] if m["mountPath"] == str(spec_path.parent))
    volume = next(v for v in head["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    spec = validate_spec(yaml.safe_load(config_map["data"][spec_path.name]), source="rayjob ConfigMap")
    assert spec.storage.uri.startswith("s3://") and spec.scaling.use_gpu
    check_cluster_storage(spec)
    _check_ray_cluster_spec(job["spec"]["rayClusterSpec"])


def test_local_head_script_starts_a_blocking_token_auth_head_on_loopback():
    script = (CLUSTER / "local.sh").read_text()
    assert "ray start --head --block" in script and "--node-ip-address=127.0.0.1" in script
    assert "RAY_AUTH_MODE=token" in script and "ray stop" not in script
    assert subprocess.run(["bash", "-n", str(CLUSTER / "local.sh")]).returncode == 0


@pytest.mark.parametrize("name", ["cluster-lora.yaml", "cluster-local.yaml"])
def test_cluster_job_examples_validate_and_use_shared_storage(name):
    spec = load_spec(REPO / "jobs" / name)
    check_cluster_storage(spec)


def test_dockerfile_installs_this_package_on_the_ray_image():
    text = (CLUSTER / "Dockerfile").read_text()
    assert "FROM rayproject/ray:2.60" in text and "pip install" in text


def _spec(**sections):
    raw = {"name": "j", "model": {"path": "builtin:tiny-llama"}, "data": {"path": "builtin:arithmetic"}} | sections
    return validate_spec(raw)


def test_local_only_storage_is_refused_for_cluster_jobs_unless_shared():
    with pytest.raises(JobSpecError, match="storage.uri: a cluster job needs storage every node can reach"):
        check_cluster_storage(_spec())
    with pytest.raises(JobSpecError, match="storage.shared_filesystem: true"):
        check_cluster_storage(_spec(storage={"uri": "file:///data/runs"}))
    check_cluster_storage(_spec(storage={"uri": "file:///mnt/nfs/runs", "shared_filesystem": True}))
    check_cluster_storage(_spec(storage={"uri": "s3://bucket/prefix"}))


def test_runtime_env_carries_spec_package_and_credentials_and_user_overrides(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://store:8333")
    spec = _spec(storage={"uri": "s3://bucket/p"})
    env = build_runtime_env(tmp_path, spec, None, cluster_credentials=False)
    assert env["working_dir"] == str(tmp_path) and validate_spec(yaml.safe_load((tmp_path / "job.yaml").read_text())) == spec
    assert Path(env["py_modules"][0]).name == "orchestrator" and (Path(env["py_modules"][0]) / "cli.py").exists()
    # Secrets travel in the working_dir, loaded by its sitecustomize; Ray logs env_vars, so never there.
    assert env["env_vars"]["AWS_ENDPOINT_URL"] == "http://store:8333" and "s3cr3t" not in json.dumps(env)
    assert json.loads((tmp_path / CREDENTIALS_FILE).read_text()) == {"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "s3cr3t"}
    assert (tmp_path / CREDENTIALS_FILE).stat().st_mode & 0o077 == 0
    loaded = subprocess.run([sys.executable, "-c", "import os; print(os.environ.get('AWS_SECRET_ACCESS_KEY'))"],
                            env={"PYTHONPATH": str(tmp_path), "PATH": os.environ["PATH"]}, capture_output=True, text=True)
    assert loaded.stdout.strip() == "s3cr3t"
    role_dir = tmp_path / "role"
    role_dir.mkdir()
    role = build_runtime_env(role_dir, spec, {"py_modules": [], "pip": ["orchestrator==0.1.0"], "env_vars": {"HF_HOME": "/cache"}},
                             cluster_credentials=True)
    assert not (role_dir / CREDENTIALS_FILE).exists() and not (role_dir / "sitecustomize.py").exists()
    assert "AWS_SECRET_ACCESS_KEY" not in role["env_vars"] and "AWS_ACCESS_KEY_ID" not in role["env_vars"]
    assert role["env_vars"]["HF_HOME"] == "/cache" and role["env_vars"]["AWS_ENDPOINT_URL"] == "http://store:8333"
    assert role["py_modules"] == [] and role["pip"] == ["orchestrator==0.1.0"]
    assert "s3cr3t" not in (tmp_path / "job.yaml").read_text() + (role_dir / "job.yaml").read_text()


def test_runtime_env_file_errors_are_one_line(tmp_path):
    bad = tmp_path / "env.yaml"
    bad.write_text("[1, 2]")
    with pytest.raises(JobSpecError, match="a runtime env must be a mapping"):
        load_runtime_env(str(bad))
    with pytest.raises(JobSpecError, match="cannot read runtime env"):
        load_runtime_env(str(tmp_path / "missing.yaml"))


def test_entrypoint_runs_the_same_cli_as_a_local_run():
    assert entrypoint("run", "20261123-1", False) == "python -m orchestrator run job.yaml --run-id 20261123-1"
    assert entrypoint("tune", None, True) == "python -m orchestrator tune job.yaml --resume"


@pytest.mark.parametrize("given, expected", [
    ("http://head:8265/", "http://head:8265"), ("head:8265", "http://head:8265"), ("https://ray.example.com", "https://ray.example.com"),
])
def test_dashboard_url_normalises(given, expected, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert dashboard_url(given) == expected


def test_auth_token_comes_from_where_rays_tools_look(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert auth_headers() == {}
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("home-token\n")
    assert auth_headers() == {"Authorization": "Bearer home-token"}
    (tmp_path / "elsewhere").write_text("path-token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "elsewhere"))
    assert auth_headers() == {"Authorization": "Bearer path-token"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "env-token")
    assert auth_headers() == {"Authorization": "Bearer env-token"}


def test_dashboard_url_errors(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ClusterError, match="no cluster address"):
        dashboard_url(None)
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    with pytest.raises(ClusterError, match="Ray Client address"):
        dashboard_url(None)


def test_scaling_fields_map_to_worker_resources_and_the_fit_check():
    spec = _spec(scaling={"num_workers": 4, "use_gpu": True, "gpus_per_worker": 2, "cpus_per_worker": 8,
                          "accelerator_type": "H100", "placement_strategy": "SPREAD"})
    per_worker = worker_resources(spec)
    assert per_worker == {"CPU": 8, "GPU": 2, "accelerator_type:H100": 0.001}
    assert cluster_needs(spec)["GPU"] == 8
    node = {"CPU": 96, "GPU": 8, "accelerator_type:H100": 1}
    assert shortfall(cluster_needs(spec), per_worker, 4, node, [node]) is None
    assert "GPU 8 (cluster has 4)" in shortfall(cluster_needs(spec), per_worker, 4, {**node, "GPU": 4}, [{**node, "GPU": 4}])
    split = [{"CPU": 96, "GPU": 3, "accelerator_type:H100": 1}] * 3  # 9 GPUs in all, but only 1 worker fits per node
    assert "only 3 of 4 workers" in shortfall(cluster_needs(spec), per_worker, 4, {"CPU": 288, "GPU": 9, "accelerator_type:H100": 3}, split)
    with pytest.raises(JobSpecError, match="scaling.accelerator_type: needs scaling.use_gpu: true"):
        _spec(scaling={"accelerator_type": "A100"})


def test_submit_refuses_local_storage_before_contacting_any_cluster(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"name": "j", "model": {"path": "builtin:tiny-llama"}, "data": {"path": "builtin:arithmetic"}}))
    result = subprocess.run([sys.executable, "-m", "orchestrator", "submit", str(job), "--address", "http://10.255.255.1:8265"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "storage.uri" in result.stderr


@pytest.mark.slow
def test_placement_of_a_4_worker_gpu_job_on_fake_gpu_nodes():
    """bench/placement.py: a real multi-node Ray (fake GPUs) places the ScalingConfig's bundles."""
    result = subprocess.run([sys.executable, str(REPO / "bench" / "placement.py"), "--json"], capture_output=True,
                            text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["PACK"]["bundle"] == {"CPU": 2.0, "GPU": 1.0, "accelerator_type:A100": 0.001}
    for strategy in ("PACK", "SPREAD", "STRICT_PACK"):
        nodes = outcome[strategy]["nodes"]
        assert outcome[strategy]["placed"] and len(nodes) == 4 and "head" not in nodes  # the head has no GPU
    assert len(set(outcome["STRICT_PACK"]["nodes"])) == 1
    assert not outcome["STRICT_SPREAD"]["placed"]  # one worker per node needs 4 nodes; there are 2


class _HeadStartingUp:
    """Ray's job client against a head whose job agent registers after `busy` refusals (a remote head cannot run here)."""

    def __init__(self, busy: int, error: str = "Request failed with status code 500: No available agent to submit job, please try again later."):
        self.busy, self.error, self.calls = busy, error, 0

    def submit_job(self, **job):
        self.calls += 1
        if self.calls <= self.busy:
            raise RuntimeError(self.error)
        return job["submission_id"]


def test_submit_waits_for_the_job_agent_of_a_head_that_just_started(monkeypatch):
    from orchestrator.launch import submit as submit_module
    from orchestrator.launch.cluster_client import Cluster

    monkeypatch.setattr(submit_module, "AGENT_RETRY_S", 0)
    said = []
    starting = Cluster("http://head:8265", {}, _HeadStartingUp(busy=3))
    submit_module._submit_when_an_agent_is_up(starting, said.append, submission_id="x")
    assert starting.client.calls == 4 and len(said) == 1 and "no job agent yet" in said[0]

    monkeypatch.setattr(submit_module, "AGENT_WAIT_S", 0)
    never = Cluster("http://head:8265", {}, _HeadStartingUp(busy=10**6))
    with pytest.raises(ClusterError, match="refused the job: .*No available agent"):
        submit_module._submit_when_an_agent_is_up(never, said.append, submission_id="x")

    refused = Cluster("http://head:8265", {}, _HeadStartingUp(busy=1, error="runtime_env: bad pip spec"))
    with pytest.raises(ClusterError, match="refused the job: runtime_env: bad pip spec"):
        submit_module._submit_when_an_agent_is_up(refused, said.append, submission_id="x")
    assert refused.client.calls == 1
