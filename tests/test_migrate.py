"""PUMA end to end on tiny models: migrate (CTR; rating runs on S3 in test_cluster_job.py), the
rewrite command, chain, aggregate, and the bad inputs of a migration. Source stores are written
directly (random prompts tagged with the source model's fingerprint): the machinery is under test
here, not prompt quality."""

import numpy as np
import pyarrow as pa
import pytest
from conftest import random_store, users_of
from test_rewrite import make_adapter

from puma_ray import config as C
from puma_ray import outputs, storage
from puma_ray.data import hashed_fraction
from puma_ray.errors import PumaError
from puma_ray.pipeline import migrate
from puma_ray.rewrite import rewrite
from puma_ray.schema import read_prompt_store
from puma_ray.stage2 import training_rows

FAST = {
    "adapter": {"width": 32},
    "train": {"epochs": 1, "batch_size": 64, "lr": 3e-3},
    "scaling": {"num_workers": 1},  # 2 workers: test_fault_tolerance, test_cluster_job
    "rewrite": {"batch_size": 16},
}


def mcfg(tmp_path, data_dir, target, sources, name, task="rating", **over):
    base = {
        "task": task,
        "model": {"path": target},
        "sources": sources,
        "output": str(tmp_path / name),
        "data": {"train": f"{data_dir}/train", "valid": f"{data_dir}/valid"},
        "select": {"budget": 20, "clusters": 3, "min_per_cluster": 2},
        "run": {"name": name, "storage_path": str(tmp_path / "ray")},
        **FAST,
    }
    return C.build(C.MigrateConfig, C.deep_merge(base, over))


def test_migrate_ctr(tmp_path, tiny_models, ctr_data, ray_session):
    users = users_of(ctr_data)
    src = random_store(str(tmp_path / "src"), tiny_models["gemma3"], users + ["ghost1", "ghost2"], task="ctr")
    report = migrate(
        mcfg(
            tmp_path,
            ctr_data,
            tiny_models["phi3"],
            [src],
            "mc",
            task="ctr",
            select={"budget": 0.5, "strategy": "random"},
        )
    )
    puma = report["evaluation"]["methods"]["puma"]
    assert 0 <= puma["auc"] <= 1 and "uauc" in puma
    # users with prompts but no interactions are counted and skipped, never selected...
    assert report["summary"]["selection"]["skipped_no_interactions"] == 2
    assert report["summary"]["source_users"] == len(users) + 2  # ...but every user is still rewritten
    _, ids, _ = read_prompt_store(str(tmp_path / "mc" / "prompts"))
    assert sorted(ids) == sorted(users + ["ghost1", "ghost2"])
    # everything was staged and published: nothing left in the staging, every part in place
    out = str(tmp_path / "mc")
    assert not storage.exists(outputs.staged(out))
    for part in ("profile", "selection", "adapter/adapter.json", "head.json", "head.safetensors", "manifest.json"):
        assert storage.exists(f"{out}/{part}"), part


def test_chain_and_aggregate(tmp_path, tiny_models, rating_data, ray_session):
    """One chain whose first step aggregates two sources: [A;B] -> qwen2 -> phi3."""
    users = users_of(rating_data)
    a = random_store(str(tmp_path / "a"), tiny_models["llama"], users)
    b = random_store(str(tmp_path / "b"), tiny_models["gemma3"], users[3:], seed=1)  # 3 users lack a B prompt
    chain = migrate(
        mcfg(
            tmp_path,
            rating_data,
            tiny_models["phi3"],
            [a, b],
            "chain",
            chain=[{"path": tiny_models["qwen2"]}],
            evaluate=False,
        )
    )
    step0 = tmp_path / "chain" / "chain-0"
    assert storage.read_json(str(step0 / "summary.json"))["missing_in_sources"] == {a: 0, b: 3}
    _, ids, _ = read_prompt_store(str(step0 / "prompts"))
    assert sorted(ids) == users[3:]  # aggregation keeps the users every source has
    adapter0 = storage.read_json(str(step0 / "adapter" / "adapter.json"))
    assert (adapter0["arch"]["d_in"], adapter0["arch"]["d_out"]) == (64 + 80, 96)
    assert [s["hidden_size"] for s in adapter0["sources"]] == [64, 80]
    final = storage.read_json(str(tmp_path / "chain" / "adapter" / "adapter.json"))
    assert (final["arch"]["d_in"], final["arch"]["d_out"]) == (96, 112)
    assert [s["model"] for s in final["sources"]] == [tiny_models["qwen2"]]  # step 2 only saw step 1's output
    assert [s["model"] for s in chain["summary"]["chain"]] == [tiny_models["qwen2"], tiny_models["phi3"]]
    _, ids, p = read_prompt_store(str(tmp_path / "chain" / "prompts"))
    assert sorted(ids) == users[3:] and p.shape[1] == 112


def test_rewrite_command_and_bad_pairings(tmp_path, tiny_models, rating_data, ray_session):
    users = users_of(rating_data)
    src = random_store(str(tmp_path / "src"), tiny_models["llama"], users)
    adapter = make_adapter(str(tmp_path / "adapter"), tiny_models["llama"], tiny_models["qwen2"])  # as migrate saves it

    def job(**over):
        base = {
            "model": {"path": tiny_models["qwen2"]},
            "sources": [src],
            "adapter": adapter,
            "output": str(tmp_path / "rw"),
        }
        return C.build(C.RewriteJobConfig, C.deep_merge(base, over))

    manifest = rewrite(job())
    _, ids, _ = read_prompt_store(str(tmp_path / "rw" / "prompts"))
    assert sorted(ids) == users and manifest["output"]["rows"] == len(users)
    with pytest.raises(PumaError, match="trained for target model"):
        rewrite(job(model={"path": tiny_models["phi3"]}))
    wrong = random_store(str(tmp_path / "wrong"), tiny_models["gemma3"], users)  # d=80 store, adapter takes 64
    with pytest.raises(PumaError, match=r"trained on source model\(s\)"):
        rewrite(job(sources=[wrong]))


def test_migrate_bad_inputs(tmp_path, tiny_models, rating_data, ray_session):
    users = users_of(rating_data)
    src = random_store(str(tmp_path / "src"), tiny_models["llama"], users + ["ghost1", "ghost2"])
    with pytest.raises(PumaError, match=f"budget 500 exceeds the {len(users)} users with interactions"):
        migrate(mcfg(tmp_path, rating_data, tiny_models["qwen2"], [src], "b1", select={"budget": 500}))
    # (users with prompts but no interactions: test_migrate_ctr)


def test_validation_users_do_not_depend_on_the_selection(tmp_path, tiny_models, rating_data, ray_session):
    """fixed_sample: the per-epoch metric's users are a hashed sample of all users, computed
    without the selection (so the same whatever is selected: Tune compares trials on them);
    selected: they are the training users."""

    users = users_of(rating_data)
    src = random_store(str(tmp_path / "src"), tiny_models["llama"], users)
    cfg = mcfg(tmp_path, rating_data, tiny_models["qwen2"], [src], "v", validation={"sample_users": 20})
    data = training_rows(cfg, src, pa.array(users[:15]), len(users))
    valid = data["valid"].to_pandas()
    train = data["train"].to_pandas()
    assert set(train["user_id"]) == set(users[:15]) and len(train) > 0 and valid["prompt"].map(len).eq(64).all()
    sample = set(np.array(users)[hashed_fraction(users, 20 / len(users))])
    assert set(valid["user_id"]) == sample and 10 <= len(sample) <= 30  # about sample_users of the 60
    assert (
        hashed_fraction(users[::-1], 20 / len(users))[::-1].tolist() == hashed_fraction(users, 20 / len(users)).tolist()
    )
    in_sample = mcfg(tmp_path, rating_data, tiny_models["qwen2"], [src], "v", validation={"users": "selected"})
    data = training_rows(in_sample, src, pa.array(users[30:45]), len(users))
    assert set(data["valid"].to_pandas()["user_id"]) == set(users[30:45])
