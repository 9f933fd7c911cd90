"""`puma-ray migrate` (the CLI) end to end on a real S3 endpoint (moto's server over HTTP), rating
task: interactions, prompt stores, profile, selection, adapter, manifest, evaluation and Ray Train
checkpoints all in a bucket; every user rewritten exactly once; stage 2 saw only the selected
users; a rerun with the same run name resumes the finished training."""

import pyarrow.parquet as pq
from test_migrate import make_store

from puma_ray import storage
from puma_ray.cli import main
from puma_ray.llm import model_info
from puma_ray.schema import read_prompt_store


def test_migrate_on_s3(tmp_path, tiny_models, rating_data, s3_bucket, ray_session, capsys):
    data = f"{s3_bucket}/data"
    for split in ("train", "valid"):  # upload the local synthetic interactions
        for f in storage.list_files(f"{rating_data}/{split}", ".parquet"):
            storage.write_bytes(f"{data}/{split}/{f.rsplit('/', 1)[-1]}", storage.read_bytes(f))
    users = sorted(set(pq.read_table(f"{rating_data}/train", columns=["user_id"]).column("user_id").to_pylist()))
    src = make_store(f"{s3_bucket}/source/prompts", tiny_models["llama"], users)
    out = f"{s3_bucket}/puma"
    args = [
        "migrate",
        f"model.path={tiny_models['qwen2']}",
        f"sources=[{src}]",
        f"data.train={data}/train",
        f"data.valid={data}/valid",
        f"output={out}",
        "select.budget=20",
        "select.clusters=3",
        "select.min_per_cluster=2",
        "adapter.width=32",
        "train.epochs=2",
        "train.batch_size=64",
        "rewrite.batch_size=16",
        "run.name=s3run",
        f"run.storage_path={s3_bucket}/ray",
    ]
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 0, err[-3000:]
    assert "testing-secret-do-not-print" not in err
    # every user rewritten exactly once, into the bucket, with per-file checksums
    manifest = storage.read_json(f"{out}/manifest.json")
    assert manifest["input"]["rows"] == manifest["output"]["rows"] == len(users)
    assert all(f["uri"].startswith(f"{out}/prompts/") and len(f["sha256"]) == 64 for f in manifest["output"]["files"])
    meta, ids, prompts = read_prompt_store(f"{out}/prompts", expect_fingerprint=model_info(tiny_models["qwen2"])[0])
    assert (
        sorted(ids) == users
        and len(ids) == len(set(ids))
        and prompts.shape == (len(users), 96)
        and meta.stage == "rewrite"
    )
    for part in (
        "profile",
        "selection/selected.parquet",
        "selection/clusters",
        "adapter/adapter.safetensors",
        "evaluation.json",
    ):
        assert storage.exists(f"{out}/{part}"), part
    ckpts = {u.split("/s3run/")[1].split("/")[0] for u in storage.list_files(f"{s3_bucket}/ray/s3run")}
    assert len([c for c in ckpts if c.startswith("checkpoint_") and not c.endswith(".json")]) == 2, (
        ckpts
    )  # Ray Train checkpointed to the bucket
    # stage 2 saw only the selected users' interactions (2 epochs)
    summary = storage.read_json(f"{out}/summary.json")
    sel = set(storage.read_table(f"{out}/selection/selected.parquet").column("user_id").to_pylist())
    assert summary["selected_users"] == len(sel) == 20
    rows = sum(
        1 for u in pq.read_table(f"{rating_data}/train", columns=["user_id"]).column("user_id").to_pylist() if u in sel
    )
    assert 2 * (rows - 2) <= summary["lm_sample_passes"] <= 2 * rows
    puma = storage.read_json(f"{out}/evaluation.json")["methods"]["puma"]
    assert puma["unknown_rows"] == 0 and "rmse_in_adapter_users" in puma and "rmse_out_adapter_users" in puma
    # the same run name again resumes the finished training (no epoch retrained) instead of starting over
    assert main(args + ["evaluate=false"]) == 0
    again = storage.read_json(f"{out}/summary.json")
    assert again["lm_sample_passes"] == summary["lm_sample_passes"] and again["train_wall_s"] == summary["train_wall_s"]
