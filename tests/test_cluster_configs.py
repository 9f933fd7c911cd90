"""cluster/ and the GPU preset stay valid: the AWS cluster-launcher YAML against Ray's own schema,
the KubeRay manifests for structure (images, GPU resources, S3 credentials from a Secret, an
entrypoint that runs an existing jobs/ file with a config that loads), one Ray version everywhere,
thin job entrypoints, and configs/migrate_gpu.yaml through puma_ray.config."""

from __future__ import annotations

import ast
import re
import shlex
import subprocess
from importlib.metadata import requires
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from ray.autoscaler._private.util import prepare_config, validate_config

from puma_ray import config as C
from puma_ray.runtime import deepspeed_config

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"
JOBS = ("prompts", "migrate", "rewrite", "evaluate")
CONFIG_OF_JOB = {
    "prompts": C.PromptsConfig,
    "migrate": C.MigrateConfig,
    "rewrite": C.RewriteJobConfig,
    "evaluate": C.EvaluateConfig,
}


def load_yaml(rel: str):
    return yaml.safe_load((REPO / rel).read_text())


def dockerfile_ray_version() -> str:
    m = re.search(r"^FROM rayproject/ray:(\d+\.\d+\.\d+)-py3\d+-gpu\s*$", (CLUSTER / "Dockerfile").read_text(), re.M)
    assert m, "cluster/Dockerfile must build FROM a rayproject/ray:<version>-py3xx-gpu image"
    return m.group(1)


def check_entrypoint(entrypoint: str) -> C.BaseModel:
    """`python jobs/<job>.py --config FILE key=value...`: the job file exists and the config loads."""
    argv = shlex.split(entrypoint)
    assert argv[0] == "python" and re.fullmatch(r"jobs/\w+\.py", argv[1]), argv[:2]
    assert (REPO / argv[1]).is_file(), f"{argv[1]} does not exist"
    assert argv[2] == "--config" and (REPO / argv[3]).is_file(), argv[2:4]
    overrides = argv[4:]
    assert all("=" in o and not o.startswith("-") for o in overrides), overrides
    return C.load(CONFIG_OF_JOB[Path(argv[1]).stem], str(REPO / argv[3]), overrides)


def test_gpu_preset_loads_and_asks_for_gpus():
    cfg = C.load(C.MigrateConfig, str(REPO / "configs" / "migrate_gpu.yaml"))
    assert cfg.model.dtype == "bfloat16" and cfg.scaling.use_gpu and cfg.scaling.zero_stage in (2, 3)
    assert (
        cfg.scaling.num_workers >= 2
        and cfg.rewrite.num_gpus > 0
        and cfg.scoring.num_gpus > 0
        and cfg.run.max_failures >= 1
    )
    assert cfg.train.batch_size >= 64 and cfg.rewrite.batch_size >= 8192
    uris = [*cfg.sources, cfg.data.train, cfg.data.valid, cfg.output, cfg.run.storage_path]
    assert all(u.startswith("s3://") for u in uris), uris  # shared storage: nothing node-local on a cluster
    # device choice lives in puma_ray.runtime: this preset turns bf16 and its ZeRO stage on there
    ds = deepspeed_config(cfg.scaling, cfg.train, cfg.model.dtype)
    assert (
        ds["bf16"]["enabled"]
        and not ds["fp16"]["enabled"]
        and ds["zero_optimization"]["stage"] == cfg.scaling.zero_stage
    )
    # the placeholders are meant to be overridden on the command line
    over = C.load(
        C.MigrateConfig,
        str(REPO / "configs" / "migrate_gpu.yaml"),
        ["sources=[s3://b/src]", "data.train=s3://b/train", "scaling.num_workers=8"],
    )
    assert over.sources == ["s3://b/src"] and over.data.train == "s3://b/train" and over.scaling.num_workers == 8


def test_aws_launcher_config_passes_rays_schema():
    raw = load_yaml("cluster/aws-gpu.yaml")
    validate_config(prepare_config(raw))  # Ray's ray-schema.json, after Ray's own defaults are merged in
    assert raw["provider"]["type"] == "aws"
    types = raw["available_node_types"]
    assert raw["head_node_type"] in types
    gpu = [t for t in types.values() if re.match(r"(g[4-6]|p[3-5])", t["node_config"]["InstanceType"])]
    assert gpu and all(t["max_workers"] >= 1 for t in gpu), "a GPU worker node type that can scale up"
    assert raw["docker"]["image"] == f"rayproject/ray:{dockerfile_ray_version()}-py311-gpu"
    # the project is synced to every node and installed there
    ((remote, local),) = raw["file_mounts"].items()
    assert local == "." and any("pip install" in c and remote in c for c in raw["setup_commands"])
    assert "AWS_SECRET_ACCESS_KEY" not in (REPO / "cluster" / "aws-gpu.yaml").read_text()


def containers(cluster_spec: dict) -> list[tuple[str, dict]]:
    out = [("head", c) for c in cluster_spec["headGroupSpec"]["template"]["spec"]["containers"]]
    for g in cluster_spec["workerGroupSpecs"]:
        out += [(g["groupName"], c) for c in g["template"]["spec"]["containers"]]
    return out


def check_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == dockerfile_ray_version()
    pods = containers(spec)
    images = {c["image"] for _, c in pods}
    assert len(images) == 1 and next(iter(images)).endswith("-gpu"), images
    assert "dashboard-host" in spec["headGroupSpec"]["rayStartParams"]
    gpu_groups = [
        g
        for g in spec["workerGroupSpecs"]
        if all(
            str(c["resources"]["limits"].get("nvidia.com/gpu", "0")) not in ("0", "")
            for c in g["template"]["spec"]["containers"]
        )
    ]
    assert gpu_groups, "a worker group whose containers ask for nvidia.com/gpu"
    for g in gpu_groups:
        assert g["maxReplicas"] >= g["replicas"] >= g["minReplicas"] >= 0
        for c in g["template"]["spec"]["containers"]:
            assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"]
    for where, c in pods:  # S3 credentials only by reference to a Secret, in every pod
        env = {e["name"]: e for e in c.get("env", [])}
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert key in env and "value" not in env[key], (where, key)
            ref = env[key]["valueFrom"]["secretKeyRef"]
            assert ref["name"] and ref["key"] == key


def test_kuberay_raycluster():
    rc = load_yaml("cluster/kuberay/raycluster.yaml")
    assert rc["apiVersion"] == "ray.io/v1" and rc["kind"] == "RayCluster" and rc["metadata"]["name"]
    check_cluster_spec(rc["spec"])


def test_kuberay_rayjob_runs_a_job_entrypoint():
    job = load_yaml("cluster/kuberay/rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    spec = job["spec"]
    cfg = check_entrypoint(spec["entrypoint"])
    assert isinstance(cfg, C.MigrateConfig) and cfg.scaling.use_gpu and "YOUR-BUCKET" not in cfg.model_dump_json()
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"] and not any(k.startswith("AWS_") for k in runtime_env.get("env_vars", {}))
    assert spec["shutdownAfterJobFinishes"] is True
    check_cluster_spec(spec["rayClusterSpec"])
    assert spec["rayClusterSpec"] == load_yaml("cluster/kuberay/raycluster.yaml")["spec"]  # one cluster definition


def test_dockerfile_ray_version_fits_pyproject():
    ray = next(r for r in map(Requirement, requires("puma-ray")) if r.name == "ray" and not r.marker)
    assert dockerfile_ray_version() in ray.specifier, (dockerfile_ray_version(), str(ray))


@pytest.mark.parametrize("job", JOBS)
def test_job_entrypoints_are_thin(job):
    """jobs/<job>.py: imports + one call of the CLI with the job's command and the given argv."""
    tree = ast.parse((REPO / "jobs" / f"{job}.py").read_text())
    body = [n for n in tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]  # docstring
    assert all(isinstance(n, (ast.Import, ast.ImportFrom, ast.If)) for n in body), [type(n).__name__ for n in body]
    assert sum(isinstance(n, ast.If) for n in body) == 1
    src = ast.unparse(next(n for n in body if isinstance(n, ast.If)))
    assert "main(" in src and "sys.argv[1:]" in src


def test_local_cluster_script_usage():
    assert subprocess.run(["bash", "-n", str(CLUSTER / "local.sh")]).returncode == 0
    r = subprocess.run(["bash", str(CLUSTER / "local.sh"), "nonsense"], capture_output=True, text=True)
    assert r.returncode == 2 and "start|stop|status" in r.stderr
