"""Users who arrive after a migration: `prompts coldstart` (a centroid per new user, no training)
and `prompts train` on the migrated head (init_head + train.head_lr=0, init_prompts)."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from sklearn.cluster import KMeans

from puma_ray import config as C
from puma_ray import outputs, storage
from puma_ray.coldstart import cold_start
from puma_ray.errors import PumaError
from puma_ray.heads import load_head
from puma_ray.llm import FrozenLM, row_texts
from puma_ray.schema import read_prompt_store
from puma_ray.stage1 import train_prompts

NEW = 5


@pytest.fixture(scope="module")
def arrivals(stage1_run, tmp_path_factory):
    """The suite's stage-1 run as the "migrated" run, and interactions of NEW users it has no
    prompt for (other users' rows under new ids) plus 2 users it knows."""
    cfg, _ = stage1_run
    root = tmp_path_factory.mktemp("arrivals")
    out = {}
    for split in ("train", "valid"):
        rows = storage.read_table(getattr(cfg.data, split))
        users = sorted(set(rows.column("user_id").to_pylist()))
        renamed = {u: f"new-{u}" for u in users[:NEW]}
        keep = rows.filter(pc.is_in(rows["user_id"], value_set=pa.array(users[: NEW + 2])))
        ids = [renamed.get(u, u) for u in keep.column("user_id").to_pylist()]
        keep = keep.set_column(keep.schema.get_field_index("user_id"), "user_id", pa.array(ids, pa.string()))
        storage.write_table(str(root / split / "part-0.parquet"), keep)
        out[split] = str(root / split)
    return {"run": cfg.output, "cfg": cfg, "train": out["train"], "valid": out["valid"], "root": root}


def test_coldstart_gives_each_new_user_its_best_centroid(arrivals, ray_session):
    out = str(arrivals["root"] / "cold")
    cfg = C.build(
        C.ColdStartConfig,
        {"run": arrivals["run"], "data": {"train": arrivals["train"]}, "output": out, "clusters": 3},
    )
    summary = cold_start(cfg)
    assert (summary["users"], summary["skipped_with_prompt"], summary["clusters"]) == (NEW, 2, 3)
    assert sum(summary["users_per_centroid"]) == NEW
    meta, ids, prompts = read_prompt_store(f"{out}/prompts")
    assert sorted(ids) == ids and all(u.startswith("new-") for u in ids) and len(ids) == NEW
    assert meta.stage == "coldstart"
    assert not storage.exists(f"{out}/candidates") and not storage.exists(outputs.staged(out))

    # Every prompt is a centroid; it is the one with the lowest loss on the user's rows.
    _, known, migrated = read_prompt_store(f"{arrivals['run']}/prompts")
    migrated = migrated[np.argsort(known)]  # K-means is fit on the prompts in user_id order

    centroids = np.unique(prompts, axis=0)
    assert len(centroids) <= 3
    lm = FrozenLM(arrivals["cfg"].model.path, "rating", meta.template, meta.prompt_length)
    head = load_head(arrivals["run"], "rating", lm.fingerprint)
    rows = storage.read_table(arrivals["train"])
    km = KMeans(n_clusters=3, n_init=3, random_state=0).fit(migrated)  # the same fit (whole sample, seed 0)
    for user, prompt in zip(ids[:2], prompts[:2]):
        mine = rows.filter(pc.equal(rows["user_id"], user))
        items, _ = row_texts(mine)
        label = torch.tensor(mine["label"].to_numpy(), dtype=torch.float32)
        losses = []
        for c in km.cluster_centers_.astype(np.float32):
            p = torch.from_numpy(c).view(1, meta.prompt_length, -1).expand(len(items), -1, -1)
            with torch.no_grad():
                losses.append(float(head.row_loss(lm.forward(p, lm.collate(items)), label)[0].mean()))
        np.testing.assert_allclose(prompt, km.cluster_centers_[int(np.argmin(losses))], rtol=1e-5, atol=1e-6)

    again = C.build(C.ColdStartConfig, {**cfg.model_dump(), "data": {"train": arrivals["cfg"].data.train}})
    with pytest.raises(PumaError, match="every user already has a prompt"):
        cold_start(again)


def test_new_users_train_on_the_migrated_head(arrivals, stage1_cfg, ray_session):
    cold = str(arrivals["root"] / "cold2")
    cold_start(
        C.build(
            C.ColdStartConfig,
            {"run": arrivals["run"], "data": {"train": arrivals["train"]}, "output": cold, "clusters": 3},
        )
    )
    _, init_ids, init = read_prompt_store(f"{cold}/prompts")
    head_before = storage.read_bytes(f"{arrivals['run']}/head.safetensors")
    data = {"data": {"train": arrivals["train"], "valid": arrivals["valid"]}}
    common = {**data, "init_head": arrivals["run"], "init_prompts": f"{cold}/prompts", "scaling": {"num_workers": 1}}

    # One epoch on the migrated head (head_lr=0) from the centroids, at a prompt lr too small to
    # move them: the new users' prompts are their init, the two known users' are uniform, and
    # the head is the migrated one to the byte (its optimizer group stepped at lr 0).
    cfg = stage1_cfg(arrivals["root"] / "fixed", **common, train={"epochs": 1, "head_lr": 0, "prompt_lr": 1e-12})
    train_prompts(cfg)
    _, ids, got = read_prompt_store(f"{cfg.output}/prompts")
    where = {u: i for i, u in enumerate(ids)}
    assert len(ids) == NEW + 2
    np.testing.assert_allclose(got[[where[u] for u in init_ids]], init, rtol=0, atol=1e-6)
    known = [u for u in ids if u not in set(init_ids)]
    assert np.abs(got[[where[u] for u in known]]).max() <= 0.1  # uniform(-0.1, 0.1), not a centroid
    assert storage.read_bytes(f"{cfg.output}/head.safetensors") == head_before
    saved = json.loads(storage.read_bytes(f"{cfg.output}/head.json"))
    assert saved["head"] == json.loads(storage.read_bytes(f"{arrivals['run']}/head.json"))["head"]


def test_init_errors_are_one_line(arrivals, stage1_cfg, tmp_path):
    other = tmp_path / "other"
    for name in ("head.safetensors", "head.json"):
        storage.write_bytes(str(other / name), storage.read_bytes(f"{arrivals['run']}/{name}"))
    meta = json.loads(storage.read_bytes(str(other / "head.json")))
    storage.write_bytes(str(other / "head.json"), json.dumps({**meta, "model_fingerprint": "abc"}).encode())
    cfg = stage1_cfg(tmp_path / "a", init_head=str(other))
    with pytest.raises(PumaError, match="head was trained on model fingerprint abc"):
        train_prompts(cfg)
    assert not storage.exists(cfg.output)
