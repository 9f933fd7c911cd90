"""PUMA end to end on tiny models: migrate (rating and CTR), rewrite exactly-once, chain, aggregate,
and the bad inputs of a migration. Source stores are written directly (random prompts tagged with
the source model's fingerprint): the machinery is under test here, not prompt quality."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from puma_ray import config as C
from puma_ray import storage
from puma_ray.errors import PumaError
from puma_ray.llm import model_info
from puma_ray.schema import StoreMeta, read_prompt_store, write_prompt_store

FAST = {"adapter": {"width": 32}, "train": {"epochs": 1, "batch_size": 64, "lr": 3e-3}, "rewrite": {"batch_size": 16}}


def make_store(uri, model_path, users, seed=0, l=1, task="rating"):
    fp, d = model_info(model_path)
    meta = StoreMeta(model=model_path, model_fingerprint=fp, hidden_size=d, prompt_length=l,
                     template=f"{task}_v1", stage="prompts")
    p = np.random.default_rng(seed).uniform(-0.1, 0.1, (len(users), l * d)).astype(np.float32)
    write_prompt_store(uri, meta, users, p)
    return uri


def users_of(data_dir):
    return sorted(set(pq.read_table(f"{data_dir}/train", columns=["user_id"]).column("user_id").to_pylist()))


def mcfg(tmp_path, data_dir, target, sources, name, task="rating", **over):
    base = {"task": task, "model": {"path": target}, "sources": sources, "output": str(tmp_path / name),
            "data": {"train": f"{data_dir}/train", "valid": f"{data_dir}/valid"},
            "select": {"budget": 20, "clusters": 3, "min_per_cluster": 2},
            "run": {"name": name, "storage_path": str(tmp_path / "ray")}, **FAST}
    return C.build(C.MigrateConfig, C.deep_merge(base, over))


def test_migrate_rating_end_to_end(tmp_path, tiny_models, rating_data, ray_session):
    from puma_ray.pipeline import migrate

    users = users_of(rating_data)
    src = make_store(str(tmp_path / "src"), tiny_models["llama"], users)
    report = migrate(mcfg(tmp_path, rating_data, tiny_models["qwen2"], [src], "m1"))
    out = str(tmp_path / "m1")
    meta, ids, prompts = read_prompt_store(f"{out}/prompts", expect_fingerprint=model_info(tiny_models["qwen2"])[0])
    assert sorted(ids) == users and len(ids) == len(set(ids)) and prompts.shape == (len(users), 96) and meta.stage == "rewrite"
    manifest = storage.read_json(f"{out}/manifest.json")
    assert manifest["input"]["rows"] == manifest["output"]["rows"] == len(users)
    assert sum(f["rows"] for f in manifest["output"]["files"]) == len(users) and all(len(f["sha256"]) == 64 for f in manifest["output"]["files"])
    summary = report["summary"]
    assert summary["selected_users"] == 20
    # stage 2 saw only the selected users' interactions
    sel = set(pq.read_table(f"{out}/selection/selected.parquet").column("user_id").to_pylist())
    rows = sum(1 for u in pq.read_table(f"{rating_data}/train", columns=["user_id"]).column("user_id").to_pylist() if u in sel)
    assert rows - 2 <= summary["lm_sample_passes"] <= rows
    puma = report["evaluation"]["methods"]["puma"]
    assert puma["unknown_rows"] == 0 and "rmse_in_adapter_users" in puma and "rmse_out_adapter_users" in puma
    # re-running with the same run name resumes the finished training instead of starting over
    again = migrate(mcfg(tmp_path, rating_data, tiny_models["qwen2"], [src], "m1"))
    assert again["summary"]["lm_sample_passes"] == summary["lm_sample_passes"]


def test_migrate_ctr(tmp_path, tiny_models, ctr_data, ray_session):
    from puma_ray.pipeline import migrate

    src = make_store(str(tmp_path / "src"), tiny_models["gemma3"], users_of(ctr_data), task="ctr")
    report = migrate(mcfg(tmp_path, ctr_data, tiny_models["phi3"], [src], "mc", task="ctr", select={"budget": 0.5, "strategy": "random"}))
    puma = report["evaluation"]["methods"]["puma"]
    assert 0 <= puma["auc"] <= 1 and "uauc" in puma


def test_chain_and_aggregate(tmp_path, tiny_models, rating_data, ray_session):
    from puma_ray.pipeline import migrate

    users = users_of(rating_data)
    a = make_store(str(tmp_path / "a"), tiny_models["llama"], users)
    b = make_store(str(tmp_path / "b"), tiny_models["gemma3"], users[3:], seed=1)  # 3 users lack a B prompt
    agg = migrate(mcfg(tmp_path, rating_data, tiny_models["qwen2"], [a, b], "agg", evaluate=False))
    assert agg["summary"]["missing_in_sources"] == {a: 0, b: 3}
    _, ids, _ = read_prompt_store(str(tmp_path / "agg" / "prompts"))
    assert sorted(ids) == users[3:]
    adapter = storage.read_json(str(tmp_path / "agg" / "adapter" / "adapter.json"))
    assert adapter["arch"]["d_in"] == 64 + 80 and [s["hidden_size"] for s in adapter["sources"]] == [64, 80]

    chain = migrate(mcfg(tmp_path, rating_data, tiny_models["phi3"], [a], "chain", chain=[{"path": tiny_models["qwen2"]}], evaluate=False))
    step0 = storage.read_json(str(tmp_path / "chain" / "chain-0" / "adapter" / "adapter.json"))
    final = storage.read_json(str(tmp_path / "chain" / "adapter" / "adapter.json"))
    assert (step0["arch"]["d_in"], step0["arch"]["d_out"]) == (64, 96) and (final["arch"]["d_in"], final["arch"]["d_out"]) == (96, 112)
    assert final["sources"][0]["model"] == tiny_models["qwen2"]  # step 2 only saw step 1's output store
    assert [s["model"] for s in chain["summary"]["chain"]] == [tiny_models["qwen2"], tiny_models["phi3"]]
    _, ids, p = read_prompt_store(str(tmp_path / "chain" / "prompts"))
    assert sorted(ids) == users and p.shape[1] == 112


def test_rewrite_command_and_bad_pairings(tmp_path, tiny_models, rating_data, ray_session):
    from puma_ray.pipeline import migrate
    from puma_ray.rewrite import rewrite

    users = users_of(rating_data)
    src = make_store(str(tmp_path / "src"), tiny_models["llama"], users)
    migrate(mcfg(tmp_path, rating_data, tiny_models["qwen2"], [src], "m", evaluate=False))
    adapter = str(tmp_path / "m" / "adapter")

    def job(**over):
        base = {"model": {"path": tiny_models["qwen2"]}, "sources": [src], "adapter": adapter, "output": str(tmp_path / "rw")}
        return C.build(C.RewriteJobConfig, C.deep_merge(base, over))

    manifest = rewrite(job())
    _, ids, _ = read_prompt_store(str(tmp_path / "rw" / "prompts"))
    assert sorted(ids) == users and manifest["output"]["rows"] == len(users)
    with pytest.raises(PumaError, match="trained for target model"):
        rewrite(job(model={"path": tiny_models["phi3"]}))
    wrong = make_store(str(tmp_path / "wrong"), tiny_models["gemma3"], users)  # d=80 store, adapter takes 64
    with pytest.raises(PumaError, match=r"trained on source model\(s\)"):
        rewrite(job(sources=[wrong]))


def test_migrate_bad_inputs(tmp_path, tiny_models, rating_data, ray_session):
    from puma_ray.pipeline import migrate

    users = users_of(rating_data)
    src = make_store(str(tmp_path / "src"), tiny_models["llama"], users + ["ghost1", "ghost2"])
    with pytest.raises(PumaError, match=f"budget 500 exceeds the {len(users)} users with interactions"):
        migrate(mcfg(tmp_path, rating_data, tiny_models["qwen2"], [src], "b1", select={"budget": 500}))
    # users with prompts but no interactions are counted and skipped, never selected
    report = migrate(mcfg(tmp_path, rating_data, tiny_models["qwen2"], [src], "b2", evaluate=False))
    assert report["summary"]["selection"]["skipped_no_interactions"] == 2
    assert report["summary"]["source_users"] == len(users) + 2  # ...but every user is still rewritten


def test_validation_users_do_not_depend_on_the_selection(tmp_path, tiny_models, rating_data, ray_session):
    """fixed_sample: the per-epoch metric's users are the same whatever is selected (Tune compares
    trials on them); selected: they are the training users."""
    import pyarrow as pa

    from puma_ray.data import hashed_fraction
    from puma_ray.pipeline import _training_data

    users = users_of(rating_data)
    src = make_store(str(tmp_path / "src"), tiny_models["llama"], users)
    cfg = mcfg(tmp_path, rating_data, tiny_models["qwen2"], [src], "v", validation={"sample_users": 20})
    seen = []
    for chosen in (users[:15], users[30:45]):
        data, rows = _training_data(cfg, src, pa.array(chosen), len(users))
        train_ids = set(data["train"].to_pandas()["user_id"])
        valid = data["valid"].to_pandas()
        assert train_ids == set(chosen) and rows > 0 and valid["prompt"].map(len).eq(64).all()
        seen.append(set(valid["user_id"]))
    assert seen[0] == seen[1] == set(np.array(users)[hashed_fraction(users, 20 / len(users))])
    assert 10 <= len(seen[0]) <= 30  # about sample_users of the 60
    in_sample = mcfg(tmp_path, rating_data, tiny_models["qwen2"], [src], "v", validation={"users": "selected"})
    data, _ = _training_data(in_sample, src, pa.array(users[:15]), len(users))
    assert set(data["valid"].to_pandas()["user_id"]) == set(users[:15])
