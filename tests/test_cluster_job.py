"""The jobs on a real multi-node Ray cluster: cluster/local.sh starts a head and a worker node on
this machine (each its own raylet, CPUs, resources, temp dir and ports), jobs go in through the
Ray Jobs API with the repo as working_dir, every input and output lives in a real HTTP S3 endpoint
(moto's server on loopback), and the S3 credentials reach the job ONLY through its runtime_env
(the cluster's processes are started without them).

This test process never joins the cluster (no ray.init here): it speaks to the dashboard's HTTP
API only, so the suite's in-process Ray (fixture ray_session) and this cluster stay apart.

Covered: migrate end to end, rating task (interactions, source store, profile, selection, adapter,
target store + manifest, evaluation and the Ray Train checkpoints all in the bucket; every user
rewritten exactly once; stage 2 saw only the selected users; work spread over both nodes; no
secret in the logs), and the same job submitted again resumes its finished training instead of
starting over; a rewrite job stopped mid-way and submitted again resumes and ends with every user
exactly once; `cluster/local.sh stop` leaves no process behind.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.compute as pc
import pytest
import requests
import yaml
from conftest import random_store, users_of
from ray.job_submission import JobStatus, JobSubmissionClient

from puma_ray import outputs, storage
from puma_ray.identity import model_info
from puma_ray.schema import read_prompt_store

REPO = Path(__file__).resolve().parent.parent
LOCAL_SH = REPO / "cluster" / "local.sh"
SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="cluster/local.sh finds its processes in /proc"
)


def marked_pids(cluster_dir: str) -> list[int]:
    """PIDs of every process of the cluster: local.sh puts PUMA_RAY_CLUSTER=<dir> in their environment."""
    marker = f"PUMA_RAY_CLUSTER={cluster_dir}".encode()
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if marker in (p / "environ").read_bytes().split(b"\0"):
                    pids.append(int(p.name))
            except OSError:
                pass
    return pids


@dataclass
class LocalCluster:
    dir: str
    dashboard: str
    headers: dict
    env: dict

    def run(self, cmd: str, timeout: float = 300) -> subprocess.CompletedProcess:
        with open(os.path.join(self.dir, f"local-{cmd}.log"), "w") as log:  # a file, not a pipe: the daemons inherit it
            return subprocess.run(
                ["bash", str(LOCAL_SH), cmd],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
            )

    def log(self, cmd: str) -> str:
        return Path(self.dir, f"local-{cmd}.log").read_text()

    def api(self, path: str) -> list[dict]:
        r = requests.get(self.dashboard + path, headers=self.headers, timeout=30)
        r.raise_for_status()
        return r.json()["data"]["result"]["result"]


@pytest.fixture
def local_cluster():
    """A head + one worker node from cluster/local.sh; stopped (and checked) even when the test fails."""
    cdir = tempfile.mkdtemp(prefix="prc-", dir="/tmp")  # short: Ray's Unix socket paths live under it
    bindir = os.path.dirname(sys.executable)
    # no RAY_* of this process (its own local Ray) and, on purpose, no AWS_*: jobs get those via runtime_env
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    env.update(
        PATH=f"{bindir}:{env.get('PATH', '')}",
        RAY=os.path.join(bindir, "ray"),
        PUMA_CLUSTER_DIR=cdir,
        PUMA_CLUSTER_WORKERS="1",
        PUMA_HEAD_CPUS="2",
        PUMA_WORKER_CPUS="2",
        PUMA_OBJECT_STORE_BYTES="200000000",
    )
    cluster = LocalCluster(cdir, "", {}, env)
    try:
        r = cluster.run("start")
        assert r.returncode == 0, cluster.log("start")
        state = dict(line.split("=", 1) for line in Path(cdir, "cluster.env").read_text().split())
        token = Path(cdir, "auth_token").read_text().strip()
        cluster.dashboard, cluster.headers = state["DASHBOARD"], {"Authorization": f"Bearer {token}"}
        yield cluster
    finally:
        if marked_pids(cdir):
            cluster.run("stop", timeout=120)
        left = marked_pids(cdir)
        for pid in left:  # ours (they carry our marker); never leave them running
            try:
                os.kill(pid, 9)
            except OSError:
                pass
        shutil.rmtree(cdir, ignore_errors=True)
        assert not left, f"cluster processes left after stop: {left}"


def upload_dir(local: str, uri: str) -> str:
    for path in sorted(Path(local).rglob("*")):
        if path.is_file():
            storage.write_bytes(storage.join(uri, str(path.relative_to(local))), path.read_bytes())
    return uri


def submit(client, job: str, config_uri: str, *overrides: str) -> str:
    """`python jobs/<job>.py --config URI key=value...` with the repo as working_dir and the S3
    settings passed through the job's runtime_env (from this process's environment, never a file)."""
    return client.submit_job(
        entrypoint=" ".join(["python", f"jobs/{job}.py", "--config", config_uri, *overrides]),
        runtime_env={
            "working_dir": str(REPO),
            "excludes": [".git", ".venv", ".ci-venv", "runs", "quickstart_out"],
            "env_vars": {k: os.environ[k] for k in SECRET_KEYS},
        },
    )


def wait(client, job_id: str, until: set, timeout: float, poll: float = 0.5) -> str:
    t0 = time.time()
    while True:
        status = client.get_job_status(job_id)
        if status in until:
            return status
        if status in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
            pytest.fail(f"job {job_id} ended {status} (waiting for {until}):\n{client.get_job_logs(job_id)[-6000:]}")
        if time.time() - t0 > timeout:
            pytest.fail(f"job {job_id} still {status} after {timeout} s:\n{client.get_job_logs(job_id)[-6000:]}")
        time.sleep(poll)


def test_jobs_on_a_local_multi_node_cluster(local_cluster, s3_bucket, tiny_models, rating_data):
    t0 = time.time()
    nodes = local_cluster.api("/api/v0/nodes")
    assert [n["state"] for n in nodes] == ["ALIVE", "ALIVE"]
    assert sorted("puma_head" in n["resources_total"] for n in nodes) == [False, True]
    client = JobSubmissionClient(local_cluster.dashboard, headers=local_cluster.headers)

    # inputs in the bucket: interactions, a source store (tiny Llama), the config itself
    b = s3_bucket
    upload_dir(rating_data, f"{b}/data")
    users = users_of(f"{b}/data")
    random_store(f"{b}/source/prompts", tiny_models["llama"], users)
    cfg = {
        "task": "rating",
        "model": {"path": tiny_models["qwen2"]},
        "sources": [f"{b}/source/prompts"],
        "data": {"train": f"{b}/data/train", "valid": f"{b}/data/valid"},
        "output": f"{b}/out/migrate",
        "select": {"budget": 20, "clusters": 3, "min_per_cluster": 2},
        "adapter": {"width": 32},
        "train": {"epochs": 3, "batch_size": 64, "lr": 3e-3},
        "rewrite": {"batch_size": 16},
        "run": {"name": "cluster-migrate", "storage_path": f"{b}/ray"},
    }
    storage.write_bytes(f"{b}/configs/migrate.yaml", yaml.safe_dump(cfg).encode())

    # 1. migrate, config from the bucket plus key=value overrides
    overrides = ("train.epochs=2", "scaling.num_workers=2")
    job = submit(client, "migrate", f"{b}/configs/migrate.yaml", *overrides)
    wait(client, job, {JobStatus.SUCCEEDED}, timeout=600)
    logs = client.get_job_logs(job)
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in logs
    out = f"{b}/out/migrate"
    manifest = storage.read_json(f"{out}/manifest.json")  # every user rewritten exactly once, with checksums
    assert manifest["input"]["rows"] == manifest["output"]["rows"] == len(users)
    assert all(f["uri"].startswith(f"{out}/prompts/") and len(f["sha256"]) == 64 for f in manifest["output"]["files"])
    meta, ids, prompts = read_prompt_store(f"{out}/prompts", expect_fingerprint=model_info(tiny_models["qwen2"])[0])
    assert sorted(ids) == users and len(ids) == len(set(ids)) and prompts.shape == (len(users), 96)
    assert meta.stage == "rewrite"
    for part in ("profile", "selection/selected.parquet", "selection/clusters", "adapter/adapter.safetensors"):
        assert storage.exists(f"{out}/{part}"), part
    summary = storage.read_json(f"{out}/summary.json")
    assert summary["final_metrics"]["epoch"] == 1  # the override train.epochs=2 won over the file's 3
    ckpts = {u.split("/cluster-migrate/")[1].split("/")[0] for u in storage.list_files(f"{b}/ray/cluster-migrate")}
    assert len([c for c in ckpts if c.startswith("checkpoint_") and not c.endswith(".json")]) == 2, ckpts
    assert storage.list_files(f"{b}/ray/cluster-migrate", "trainable.safetensors"), ckpts
    # stage 2 saw only the selected users' interactions (2 epochs)
    sel = set(storage.read_table(f"{out}/selection/selected.parquet").column("user_id").to_pylist())
    assert summary["selected_users"] == len(sel) == 20
    train_users = storage.read_table(f"{b}/data/train", columns=["user_id"]).column("user_id").to_pylist()
    rows = sum(1 for u in train_users if u in sel)
    assert 2 * (rows - 2) <= summary["lm_sample_passes"] <= 2 * rows
    puma = storage.read_json(f"{out}/evaluation.json")["methods"]["puma"]
    assert puma["unknown_rows"] == 0 and "rmse_in_adapter_users" in puma and "rmse_out_adapter_users" in puma
    job_id = client.get_job_info(job).job_id
    actors = [
        a
        for a in local_cluster.api(
            f"/api/v0/actors?detail=true&limit=10000&filter_keys=job_id&filter_predicates=%3D&filter_values={job_id}"
        )
    ]
    assert any(a["class_name"] == "RayTrainWorker" for a in actors), [a["class_name"] for a in actors]
    tasks = local_cluster.api(
        f"/api/v0/tasks?limit=10000&filter_keys=job_id&filter_predicates=%3D&filter_values={job_id}"
    )
    used = {x["node_id"] for x in actors + tasks if x.get("node_id")}
    assert len(used) == 2, f"the job ran on {len(used)} node(s)"
    # the same run name again resumes the finished training (no epoch retrained) instead of starting over
    job = submit(client, "migrate", f"{b}/configs/migrate.yaml", *overrides, "evaluate=false")
    wait(client, job, {JobStatus.SUCCEEDED}, timeout=600)
    again = storage.read_json(f"{out}/summary.json")
    assert again["lm_sample_passes"] == summary["lm_sample_passes"] and again["train_wall_s"] == summary["train_wall_s"]
    t_migrate = time.time() - t0

    # 2. a rewrite job stopped half-way, then submitted again: resumes, every user exactly once
    big = [f"user{i:06d}" for i in range(12_000)]
    random_store(f"{b}/big/prompts", tiny_models["llama"], big, rows_per_group=120)  # 100 units (files) of 120 users
    rw = {
        "model": {"path": tiny_models["qwen2"]},
        "sources": [f"{b}/big/prompts"],
        "adapter": f"{out}/adapter",
        "output": f"{b}/out/rewrite",
        "rewrite": {"batch_size": 60, "min_rows_per_file": 120, "max_rows_per_file": 120},
    }
    storage.write_bytes(f"{b}/configs/rewrite.yaml", yaml.safe_dump(rw).encode())
    state = outputs.staged(f"{b}/out/rewrite", "rewrite_state")
    job = submit(client, "rewrite", f"{b}/configs/rewrite.yaml")
    wait(client, job, {JobStatus.RUNNING}, timeout=300, poll=0.2)
    deadline = time.time() + 300
    while not [u for u in storage.list_files(state, ".json") if "/unit-" in u]:  # a unit finished
        assert client.get_job_status(job) == JobStatus.RUNNING, client.get_job_logs(job)[-4000:]
        assert time.time() < deadline, "no rewrite unit finished in 300 s"
        time.sleep(0.1)
    assert client.stop_job(job)
    assert wait(client, job, {JobStatus.STOPPED}, timeout=60) == JobStatus.STOPPED
    assert not storage.exists(f"{b}/out/rewrite/manifest.json")  # a stopped rewrite is visibly incomplete
    finished = len([u for u in storage.list_files(state, ".json") if "/unit-" in u])
    assert 1 <= finished < 100, finished

    job = submit(client, "rewrite", f"{b}/configs/rewrite.yaml")
    wait(client, job, {JobStatus.SUCCEEDED}, timeout=400)
    resumed = re.search(r"resuming, (\d+) file\(s\) already done", client.get_job_logs(job))
    assert resumed and int(resumed.group(1)) >= finished, client.get_job_logs(job)[-4000:]
    manifest = storage.read_json(f"{b}/out/rewrite/manifest.json")
    assert manifest["input"]["rows"] == manifest["output"]["rows"] == len(big)
    ids = storage.read_table(f"{b}/out/rewrite/prompts", columns=["user_id"]).column("user_id")
    assert len(ids) == len(big) and pc.count_distinct(ids).as_py() == len(big)
    assert sorted(ids.to_pylist()) == big

    # 3. stop: nothing of the cluster is left running
    r = local_cluster.run("stop", timeout=120)
    assert r.returncode == 0, local_cluster.log("stop")
    assert marked_pids(local_cluster.dir) == []
    print(
        f"cluster job test: migrate {t_migrate:.0f} s, rewrite stopped after {finished}/100 units then resumed, "
        f"all {time.time() - t0:.0f} s"
    )
