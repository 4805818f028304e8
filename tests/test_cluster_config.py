"""Cluster mode without a cluster: the YAMLs in cluster/, the runtime env, addresses, resource fit."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from orchestrator import cli
from orchestrator.errors import JobSpecError
from orchestrator.launch.cluster_client import ClusterError, auth_headers, dashboard_url, shortfall
from orchestrator.launch.submit import CREDENTIALS_FILE, build_runtime_env, check_cluster_storage, entrypoint, load_runtime_env
from orchestrator.launch.runtime import TRIAL_SLOTS
from orchestrator.plan import cluster_needs, worker_resources
from orchestrator.spec import load_spec, validate_spec
from tests.helpers import MINIMAL_SPEC, REPO, make_spec

CLUSTER = REPO / "cluster"


def _launcher(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _ray_versions_accepted():
    """The Ray versions this package installs with (pyproject's dependency): an image must hold one."""
    return next(Requirement(r) for r in metadata.requires("orchestrator") if Requirement(r).name == "ray").specifier


def _shell_commands(line: str) -> list[list[str]]:
    """`ulimit -n 1; A=b ray start --x=1` → [["ulimit", "-n", "1"], ["A=b", "ray", "start", "--x=1"]]."""
    return [shlex.split(part) for part in line.split(";") if part.strip()]


def _flags(words: list[str]) -> dict[str, str | bool]:
    """["--port=6379", "--head"] → {"--port": "6379", "--head": True}."""
    return {name: value or True for name, _, value in (word.partition("=") for word in words)}


def _ray_start(line: str) -> tuple[dict[str, str], dict[str, str | bool]]:
    """The environment assignments and the flags of a line's `ray start`."""
    words, at = next((c, i) for c in _shell_commands(line) for i in range(len(c) - 1) if c[i:i + 2] == ["ray", "start"])
    return dict(word.split("=", 1) for word in words[:at]), _flags(words[at + 2:])


@pytest.mark.parametrize("name, provider", [("aws.yaml", "aws"), ("gcp.yaml", "gcp")])
def test_launcher_yamls_define_cpu_head_and_autoscaling_gpu_workers_that_install_this_package(name, provider):
    config = _launcher(name)
    assert config["provider"]["type"] == provider
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    # The head trains nothing; it holds the trial slots that bound a search's live trial drivers (launch/tune.py).
    assert head["resources"] == {"CPU": 0, TRIAL_SLOTS: 1} and head["min_workers"] == head["max_workers"] == 0
    gpu_types = [t for n, t in types.items() if n != config["head_node_type"]]
    assert gpu_types and all(0 <= t["min_workers"] < t["max_workers"] <= config["max_workers"] for t in gpu_types)
    image, tag = config["docker"]["image"].rsplit(":", 1)
    assert image == "rayproject/ray" and tag.endswith("-gpu") and _ray_versions_accepted().contains(tag.split("-")[0])
    # The package is this checkout, copied to every node and pip-installed there.
    mount = next(target for target, source in config["file_mounts"].items() if source == ".")
    assert any(words[:2] == ["pip", "install"] and words[-1] == mount
               for command in config["setup_commands"] for words in _shell_commands(command))
    # Token auth: the token file reaches every node, and both kinds of node start Ray with it on.
    assert config["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
    assert config["head_start_ray_commands"][0] == config["worker_start_ray_commands"][0] == "ray stop"
    head_env, head_flags = _ray_start(config["head_start_ray_commands"][-1])
    worker_env, worker_flags = _ray_start(config["worker_start_ray_commands"][-1])
    assert head_env == worker_env == {"RAY_AUTH_MODE": "token"}
    assert head_flags["--head"] is True and "--head" not in worker_flags
    assert worker_flags["--address"] == f"$RAY_HEAD_IP:{head_flags['--port']}"
    assert worker_flags["--object-manager-port"] == head_flags["--object-manager-port"]


def _documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def test_kuberay_raycluster_holds_the_cluster_job_and_exposes_the_dashboard():
    (cluster,) = _documents(CLUSTER / "kuberay" / "raycluster.yaml")
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    _check_ray_cluster_spec(cluster["spec"], load_spec(REPO / "jobs" / "cluster-lora.yaml"))
    (head,) = _containers(cluster["spec"]["headGroupSpec"]["template"])
    assert {p["containerPort"]: p["name"] for p in head["ports"]} == {6379: "gcs", 8265: "dashboard"}
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"  # reached through the pod's service


def _check_ray_cluster_spec(spec: dict, job) -> None:
    """Token auth and store credentials in every pod, cluster/Dockerfile's image at this package's version, a
    head that trains nothing, and worker groups that hold `job` (a JobSpec) at their largest."""
    assert _ray_versions_accepted().contains(spec["rayVersion"])
    head, groups = spec["headGroupSpec"], spec["workerGroupSpecs"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert json.loads(json.loads(head["rayStartParams"]["resources"])) == {TRIAL_SLOTS: 1}  # KubeRay's quoting
    containers = [c for t in [head["template"]] + [g["template"] for g in groups] for c in _containers(t)]
    for container in containers:
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token" and env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "token"
        assert container["envFrom"] == [{"secretRef": {"name": "orchestrator-s3"}}]
        assert container["resources"]["requests"] == container["resources"]["limits"]
    (image,) = {c["image"] for c in containers}
    assert image.rsplit(":", 1)[0].endswith("/orchestrator") and image.rsplit(":", 1)[1] == metadata.version("orchestrator")
    # Ray in a pod counts the CPUs and GPUs of its container's limits.
    nodes = [{"CPU": float(c["resources"]["limits"]["cpu"]), "GPU": float(c["resources"]["limits"].get("nvidia.com/gpu", 0))}
             for g in groups for _ in range(g["maxReplicas"]) for c in _containers(g["template"])]
    per_worker = {name: amount for name, amount in worker_resources(job).items() if name in ("CPU", "GPU")}
    needs = {name: amount for name, amount in cluster_needs(job).items() if name in per_worker}
    total = {name: sum(node[name] for node in nodes) for name in ("CPU", "GPU")}
    assert job.scaling.use_gpu and shortfall(needs, per_worker, job.scaling.num_workers, total, nodes) is None


def test_kuberay_rayjob_runs_orchestrator_on_a_job_spec_from_its_configmap_that_validates():
    docs = _documents(CLUSTER / "kuberay" / "rayjob.yaml")
    config_map = next(d for d in docs if d["kind"] == "ConfigMap")
    job = next(d for d in docs if d["kind"] == "RayJob")
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[:3] == ["python", "-m", "orchestrator"]
    command = cli._parser().parse_args(words[3:])
    # Not --local: the run joins the RayJob's own cluster instead of starting a Ray inside the head pod.
    assert command.command == "run" and not command.local and not command.resume and command.overrides == []
    spec_path = Path(command.job)
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    mount = next(m for c in _containers(head) for m in c["volumeMounts"] if m["mountPath"] == str(spec_path.parent))
    volume = next(v for v in head["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    spec = validate_spec(yaml.safe_load(config_map["data"][spec_path.name]), source="rayjob ConfigMap")
    # Its header says the ConfigMap can be made from jobs/cluster-lora.yaml: the two are the same job.
    assert spec == load_spec(REPO / "jobs" / "cluster-lora.yaml")
    check_cluster_storage(spec)
    _check_ray_cluster_spec(job["spec"]["rayClusterSpec"], spec)
    (submitter,) = _containers(job["spec"]["submitterPodTemplate"])
    assert submitter["image"] == _containers(head)[0]["image"]


def test_local_head_script_starts_a_blocking_token_auth_head_on_loopback(tmp_path):
    """cluster/local.sh run against a stand-in `ray` that records how it was called."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ray").write_text(
        "#!/usr/bin/env bash\n"
        f'echo "$*" >> {tmp_path}/calls\n'
        f'if [ "$1" = start ]; then printf "%s\\n" "$@" > {tmp_path}/start_args; env > {tmp_path}/start_env; fi\n'
        '[ "$*" = get-auth-token ] && [ -n "${NO_TOKEN:-}" ] && exit 1\n'
        "exit 0\n")
    (bin_dir / "ray").chmod(0o755)

    def local_sh(*args: str, **env: str) -> tuple[list[str], dict[str, str | bool], dict[str, str]]:
        (tmp_path / "calls").unlink(missing_ok=True)
        result = subprocess.run(["bash", str(CLUSTER / "local.sh"), *args], capture_output=True, text=True, timeout=60,
                                env={"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path),
                                     "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "s3cr3t", **env})
        assert result.returncode == 0, result.stderr
        start = (tmp_path / "start_args").read_text().splitlines()
        started_env = dict(line.split("=", 1) for line in (tmp_path / "start_env").read_text().splitlines() if "=" in line)
        return (tmp_path / "calls").read_text().splitlines(), _flags(start[1:]), started_env

    calls, flags, env = local_sh("3")
    assert calls[0] == "get-auth-token" and calls[-1].startswith("start ") and not any(c.startswith("stop") for c in calls)
    assert flags == {"--head": True, "--block": True, "--node-ip-address": "127.0.0.1", "--port": "6379",
                     "--dashboard-host": "127.0.0.1", "--dashboard-port": "8265", "--num-cpus": "3",
                     "--dashboard-agent-listen-port": "0", "--resources": json.dumps({TRIAL_SLOTS: 1})}
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_ADDRESS"] == "127.0.0.1:6379"
    assert "AWS_ACCESS_KEY_ID" not in env and "AWS_SECRET_ACCESS_KEY" not in env  # jobs get them from the submitter

    calls, flags, env = local_sh("2", NO_TOKEN="1", RAY_HEAD_PORT="7000", RAY_DASHBOARD_PORT="8300")
    assert calls[:2] == ["get-auth-token", "get-auth-token --generate"]
    assert (flags["--port"], flags["--dashboard-port"], flags["--num-cpus"], env["RAY_ADDRESS"]) == ("7000", "8300", "2", "127.0.0.1:7000")


@pytest.mark.parametrize("name", ["cluster-lora.yaml", "cluster-local.yaml"])
def test_cluster_job_examples_validate_and_use_shared_storage(name):
    spec = load_spec(REPO / "jobs" / name)
    check_cluster_storage(spec)


def test_dockerfile_installs_this_checkout_on_the_launchers_ray_image():
    lines = [line for line in (CLUSTER / "Dockerfile").read_text().splitlines() if line.strip() and not line.startswith("#")]
    steps = [(instruction.upper(), shlex.split(arguments)) for instruction, arguments in (line.split(None, 1) for line in lines)]
    assert steps[0] == ("FROM", [_launcher("aws.yaml")["docker"]["image"]]) and steps[0][1] == [_launcher("gcp.yaml")["docker"]["image"]]
    (copy,) = [arguments for instruction, arguments in steps if instruction == "COPY"]
    source, target = [word for word in copy if not word.startswith("--")]
    assert source == "."
    assert any(arguments[:2] == ["pip", "install"] and arguments[-1] == target for instruction, arguments in steps if instruction == "RUN")


def test_local_only_storage_is_refused_for_cluster_jobs_unless_shared():
    with pytest.raises(JobSpecError, match="storage.uri: a cluster job needs storage every node can reach"):
        check_cluster_storage(make_spec(base=MINIMAL_SPEC))
    with pytest.raises(JobSpecError, match="storage.shared_filesystem: true"):
        check_cluster_storage(make_spec(base=MINIMAL_SPEC, storage={"uri": "file:///data/runs"}))
    check_cluster_storage(make_spec(base=MINIMAL_SPEC, storage={"uri": "file:///mnt/nfs/runs", "shared_filesystem": True}))
    check_cluster_storage(make_spec(base=MINIMAL_SPEC, storage={"uri": "s3://bucket/prefix"}))


def test_runtime_env_carries_spec_package_and_credentials_and_user_overrides(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://store:8333")
    spec = make_spec(base=MINIMAL_SPEC, storage={"uri": "s3://bucket/p"})
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
    spec = make_spec(base=MINIMAL_SPEC, scaling={"num_workers": 4, "use_gpu": True, "gpus_per_worker": 2, "cpus_per_worker": 8,
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
        make_spec(base=MINIMAL_SPEC, scaling={"accelerator_type": "A100"})


def test_submit_refuses_local_storage_before_contacting_any_cluster(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(MINIMAL_SPEC))
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
