"""The bulk rewrite at scale: output file sizing, resume after a kill (exactly once, finished files
untouched), a changed input starting over, and progress output."""

import hashlib
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import yaml
from conftest import random_store

from puma_ray import outputs, storage
from puma_ray.adapter import MigrationAdapter, save_adapter
from puma_ray.config import RewriteConfig, RewriteJobConfig, ScoringConfig, build
from puma_ray.errors import PumaError
from puma_ray.identity import model_info
from puma_ray.rewrite import actors_for, eager_pool, plan_units, rewrite
from puma_ray.runtime import CORES, actor_pool_size, cores, task_concurrency
from puma_ray.schema import check_store_input


def make_adapter(uri, src_model, tgt_model):
    (sfp, sd), (tfp, td) = model_info(src_model), model_info(tgt_model)
    torch_adapter = MigrationAdapter(sd, td, width=32)
    save_adapter(
        uri,
        torch_adapter,
        [{"model": src_model, "model_fingerprint": sfp, "hidden_size": sd}],
        {"model": tgt_model, "model_fingerprint": tfp, "hidden_size": td},
        prompt_length=1,
        template="rating_v1",
    )
    return uri


def job(tmp_path, tiny_models, src, out, **rewrite):
    return build(
        RewriteJobConfig,
        {
            "model": {"path": tiny_models["qwen2"]},
            "sources": [src],
            "output": out,
            "adapter": make_adapter(str(tmp_path / "adapter"), tiny_models["llama"], tiny_models["qwen2"]),
            "rewrite": {"batch_size": 64, **rewrite},
        },
    )


def ids_of(store):
    return pq.read_table(store, columns=["user_id"]).column("user_id").to_pylist()


def test_units_respect_file_sizes(tmp_path, tiny_models):
    src = random_store(str(tmp_path / "src"), tiny_models["llama"], 1000, rows_per_group=30)
    units = plan_units(src, RewriteConfig(min_rows_per_file=100, max_rows_per_file=200))
    assert sum(u["rows"] for u in units) == 1000
    assert all(100 <= u["rows"] <= 200 for u in units[:-1]) and units[-1]["rows"] <= 200
    # a row group bigger than max_rows_per_file is one unit, split into several files when written
    big = random_store(str(tmp_path / "big"), tiny_models["llama"], 500, rows_per_group=500)
    assert [u["rows"] for u in plan_units(big, RewriteConfig(min_rows_per_file=10, max_rows_per_file=120))] == [500]
    with pytest.raises(ValueError, match="min_rows_per_file 300 > max_rows_per_file 200"):
        RewriteConfig(min_rows_per_file=300, max_rows_per_file=200)


def test_actor_pool_defaults_to_the_cluster(ray_session):
    """Rewrite (and evaluation scoring) pools. No rewrite.actors: one actor per cpus_per_actor CPUs
    (per num_gpus GPUs) of the cluster (a local Ray: of its cores); GPU actors asked of a cluster
    without GPUs are refused, not left pending forever."""
    cpus = int(min(ray.cluster_resources()["CPU"], os.cpu_count()))  # a local Ray's logical CPUs overcommit the cores
    assert ray.cluster_resources()[CORES] == os.cpu_count()
    assert cores() == cpus and task_concurrency(cpus + 1) == cpus  # CPU-bound Ray Data tasks: one per core here
    assert task_concurrency(cpus) is None  # no more tasks than cores: no cap

    def pool_size(cfg):
        return actor_pool_size(cfg, "rewrite")

    assert pool_size(RewriteConfig()) == cpus and pool_size(RewriteConfig(cpus_per_actor=2)) == max(1, cpus // 2)
    assert pool_size(RewriteConfig(actors=3)) == 3 and actor_pool_size(ScoringConfig(), "scoring") == cpus
    with pytest.raises(PumaError, match="rewrite.num_gpus is 1.0 but the Ray cluster has 0 GPUs"):
        pool_size(RewriteConfig(num_gpus=1))


def test_rewrite_splits_files_and_reports_progress(tmp_path, tiny_models, ray_session, capsys):
    src = random_store(str(tmp_path / "src"), tiny_models["llama"], 500, rows_per_group=500)
    out = str(tmp_path / "out")
    manifest = rewrite(job(tmp_path, tiny_models, src, out, min_rows_per_file=10, max_rows_per_file=120, actors=2))
    assert [f["rows"] for f in manifest["output"]["files"]] == [120, 120, 120, 120, 20]
    assert sorted(ids_of(f"{out}/prompts")) == sorted(ids_of(src)) and manifest["verified_unique"]
    assert manifest["unique_by"] == "disjoint unit id ranges"  # proven from the markers, no shuffle
    for f in manifest["output"]["files"]:  # the streamed checksum is the file's
        assert hashlib.sha256(storage.read_bytes(f["uri"])).hexdigest() == f["sha256"]
    assert "rewrite: 500 users exactly once in 5 file(s)" in capsys.readouterr().err


def test_small_stores_start_fewer_actors():
    """At most one actor per unit and, unless rewrite.actors is set, per min_rows_per_file users."""
    small, big = [{"rows": 40}] * 3, [{"rows": 100_000}] * 3
    assert actors_for(small, RewriteConfig(min_rows_per_file=200, max_rows_per_file=200)) == 1
    assert actors_for(small, RewriteConfig(min_rows_per_file=50, max_rows_per_file=200)) == 3
    assert actors_for(small, RewriteConfig(min_rows_per_file=200, max_rows_per_file=200, actors=3)) == 3
    assert actors_for(big, RewriteConfig()) == 3
    # the whole pool at once only when every actor has >= 4 files and 4 x min_rows_per_file users to do
    assert not eager_pool(small, RewriteConfig(min_rows_per_file=10, max_rows_per_file=200), 1)
    assert eager_pool([{"rows": 20_000}] * 25, RewriteConfig(), 2)  # benchmarks/rewrite_limits: 500k users
    assert not eager_pool([{"rows": 20_000}] * 25, RewriteConfig(), 8)
    assert not eager_pool([{"rows": 5_000}] * 25, RewriteConfig(), 2)


def test_killed_rewrite_resumes_exactly_once(tmp_path, tiny_models, ray_session):
    """Kill `puma-ray rewrite` (its whole process group) midway through replacing an earlier complete
    rewrite: the earlier output stays whole and readable; re-run with the same output: every user
    exactly once, and files finished before the kill are neither rewritten nor changed."""

    n = 6000
    out = str(tmp_path / "out")
    old_src = random_store(str(tmp_path / "old"), tiny_models["llama"], 100, rows_per_group=50, seed=3)
    old = rewrite(job(tmp_path, tiny_models, old_src, out, min_rows_per_file=50, max_rows_per_file=50))
    src = random_store(str(tmp_path / "src"), tiny_models["llama"], n, rows_per_group=20)
    cfg = job(tmp_path, tiny_models, src, out, min_rows_per_file=20, max_rows_per_file=20)
    (tmp_path / "rewrite.yaml").write_text(yaml.safe_dump(cfg.model_dump()))
    state = outputs.staged(out, "rewrite_state")
    proc = subprocess.Popen(
        [sys.executable, "-m", "puma_ray.cli", "rewrite", "--config", str(tmp_path / "rewrite.yaml"), "ray.num_cpus=2"],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if len(storage.list_files(state, ".json")) > 10:  # plan.json + at least 10 finished units
                break
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        err = proc.communicate()[1].decode()
    markers = [u for u in storage.list_files(state, ".json") if "unit-" in u]
    assert 10 <= len(markers) < n // 20, f"the rewrite was not caught midway ({len(markers)} units done)\n{err[-2000:]}"
    assert storage.read_json(f"{out}/manifest.json") == old  # the earlier rewrite, whole and readable
    assert check_store_input(f"{out}/prompts") and ids_of(f"{out}/prompts") == [f"user{j:06d}" for j in range(100)]
    finished = {
        outputs.final(out, f["uri"]): (os.stat(f["uri"]).st_mtime_ns, f["sha256"])
        for m in markers
        for f in storage.read_json(m)["files"]
    }

    manifest = rewrite(cfg)
    ids = ids_of(f"{out}/prompts")
    assert len(ids) == len(set(ids)) == n and manifest["output"]["rows"] == n
    after = {f["uri"]: f["sha256"] for f in manifest["output"]["files"]}
    for uri, (mtime, sha) in finished.items():
        assert os.stat(uri).st_mtime_ns == mtime and after[uri] == sha
    assert len(after) == n // 20
    assert not storage.exists(outputs.staged(out))
    assert rewrite(cfg) == manifest  # a complete rewrite of the same plan: nothing to do


def test_changed_input_starts_over(tmp_path, tiny_models, ray_session):
    src = random_store(str(tmp_path / "src"), tiny_models["llama"], 200, rows_per_group=50)
    out = str(tmp_path / "out")
    first = rewrite(job(tmp_path, tiny_models, src, out, min_rows_per_file=50, max_rows_per_file=50))
    storage.delete_dir(src)
    random_store(src, tiny_models["llama"], 150, rows_per_group=50, seed=1)  # same path, other users' prompts
    second = rewrite(job(tmp_path, tiny_models, src, out, min_rows_per_file=50, max_rows_per_file=50))
    assert first["output"]["rows"] == 200 and second["output"]["rows"] == 150
    assert len(ids_of(f"{out}/prompts")) == 150


def test_exactly_once_check_without_ordered_ids(tmp_path, tiny_models, ray_session):
    """Ids not partitioned by range: the check falls back to counting rows per user, and a user present in two
    units is refused (no manifest)."""

    ids = [f"user{j:06d}" for j in np.random.default_rng(0).permutation(300)]
    src = random_store(str(tmp_path / "shuffled"), tiny_models["llama"], ids, rows_per_group=100)
    manifest = rewrite(
        job(tmp_path, tiny_models, src, str(tmp_path / "out"), min_rows_per_file=100, max_rows_per_file=100)
    )
    assert manifest["unique_by"] == "rows per user" and manifest["output"]["rows"] == 300
    dup = random_store(str(tmp_path / "dup"), tiny_models["llama"], ids[:100] + ids[:100], rows_per_group=100)
    with pytest.raises(PumaError, match="100 users more than once"):
        rewrite(job(tmp_path, tiny_models, dup, str(tmp_path / "out2"), min_rows_per_file=100, max_rows_per_file=100))
    assert not storage.exists(str(tmp_path / "out2" / "manifest.json"))
