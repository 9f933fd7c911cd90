"""The selection strategies that run the source model (loss, FFN activations), end to end on a
trained stage-1 run: the streamed signals equal in-process ones, and select_users picks the same
users as the in-memory strategy fed those signals."""

import numpy as np
import pyarrow.compute as pc
import pytest
import torch

from puma_ray import storage
from puma_ray.config import MigrateConfig, ScoringConfig, SelectConfig, build
from puma_ray.errors import PumaError
from puma_ray.heads import load_head
from puma_ray.llm import FrozenLM, row_texts
from puma_ray.pipeline import migrate
from puma_ray.profile import profile_users
from puma_ray.schema import decode_prompts, read_prompt_store
from puma_ray.scorer import run_model
from puma_ray.select import read_selected, select_users
from puma_ray.signals import FfnFeatures, check_source_model, ffn_features, source_losses
from puma_ray.strategies import STRATEGIES, Candidates

SCORING = ScoringConfig(batch_size=64)


@pytest.fixture(scope="module")
def source(stage1_run, tmp_path_factory, ray_session):
    """The suite's stage-1 run: its dir, store, model, train rows, a profile, and its users' ids,
    prompts (N, w) and label variances (N,) in id order."""
    cfg, _ = stage1_run
    run, train = cfg.output, cfg.data.train
    profile = profile_users(train, "rating", str(tmp_path_factory.mktemp("profile") / "p"))["uri"]
    meta, ids, prompts = read_prompt_store(f"{run}/prompts")
    order = np.argsort(ids)
    prof = storage.read_table(profile).to_pandas().set_index("user_id")
    ids = [ids[i] for i in order]
    return {
        "run": run,
        "store": f"{run}/prompts",
        "model": run_model(None, run),
        "train": train,
        "profile": profile,
        "ids": ids,
        "prompts": prompts[order],
        "var": prof.loc[ids, "label_var"].to_numpy(),
        "meta": meta,
    }


@pytest.fixture(scope="module")
def losses(source):
    """source_losses of the run: a pandas Series indexed by user_id."""
    got = source_losses(source["store"], source["model"], source["train"], "rating", SCORING).to_pandas()
    return got.set_index("user_id")["loss"]


def test_source_losses_equal_in_process_head_losses(source, losses):
    got = losses
    assert sorted(got.index) == source["ids"]  # every user with training rows

    meta = source["meta"]
    lm = FrozenLM(source["model"]["path"], "rating", meta.template, meta.prompt_length)
    head = load_head(source["run"], "rating", lm.fingerprint)
    rows = storage.read_table(source["train"])
    for user in source["ids"][:5]:
        mine = rows.filter(pc.equal(rows["user_id"], user))
        prompt = torch.from_numpy(source["prompts"][source["ids"].index(user)]).view(1, meta.prompt_length, -1)
        items, _ = row_texts(mine)
        with torch.no_grad():
            out = lm.forward(prompt.expand(len(items), -1, -1), lm.collate(items))
            loss, _ = head.row_loss(out, torch.tensor(mine["label"].to_numpy(), dtype=torch.float32))
        assert got[user] == pytest.approx(float(loss.mean()), rel=1e-4)


def test_ffn_features_stream_like_in_process(source, tmp_path):
    out = str(tmp_path / "ffn")
    width = ffn_features(source["store"], source["model"], "rating", 3, SCORING, out)
    d = source["meta"].hidden_size
    assert width == 2 * d  # the tiny LM has 2 layers: at most that many are read
    got = storage.read_table(out).sort_by("user_id")
    assert got.column("user_id").to_pylist() == source["ids"]
    feats = decode_prompts(got, width)

    actor = FfnFeatures(source["model"], "rating", source["meta"].prompt_length, 3, batch_size=7)
    store = storage.read_table(source["store"]).sort_by("user_id")
    want = decode_prompts(actor(store), width)
    np.testing.assert_allclose(feats, want, rtol=1e-4, atol=1e-5)
    assert np.unique(feats.round(5), axis=0).shape[0] == len(feats)  # users differ

    # The hooked modules are the last layers' MLPs: the last block's share equals its MLP applied
    # by hand to the same input (captured by a second hook).
    block = actor.decoder.layers[-1]
    seen = []
    handle = block.mlp.register_forward_hook(lambda _m, inp, _o: seen.append(inp[0]))
    one = actor(store.slice(0, 1))
    handle.remove()
    with torch.no_grad():
        by_hand = block.mlp(seen[0]).mean(1).numpy()[0]
    np.testing.assert_allclose(decode_prompts(one, width)[0, d:], by_hand, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["kmeans_loss", "ffn_kmeans_variance"])  # loss_buckets: in-memory tests
def test_select_users_with_source_signals(source, losses, tmp_path, name):
    cfg = SelectConfig(strategy=name, budget=12, clusters=3, min_per_cluster=2, seed=1)
    out = str(tmp_path / "sel")
    summary = select_users(cfg, source["store"], source["profile"], out, source["train"], "rating", SCORING)
    chosen = read_selected(out).to_pylist()
    assert summary["selected"] == 12 and len(set(chosen)) == 12

    # The same users as the in-memory strategy given the same signals.
    loss = losses.loc[source["ids"]].to_numpy()
    ffn = None
    if name.startswith("ffn"):
        table = storage.read_table(f"{out}/ffn_features").sort_by("user_id")
        ffn = decode_prompts(table, table.schema.field("prompt").type.list_size)
    cand = Candidates.from_prompts(source["prompts"], source["var"], loss=loss, ffn=ffn)
    idx, _ = STRATEGIES[name](cand, 12, cfg, np.random.default_rng(cfg.seed))
    assert chosen == [source["ids"][i] for i in idx]
    if "loss" in name:
        assert summary["loss"]["all"]["mean"] == pytest.approx(loss.mean(), rel=1e-6)


def test_source_model_errors_are_one_line(source, tmp_path):
    bare = str(tmp_path / "store")  # a store outside any run directory
    storage.write_table(f"{bare}/part-0.parquet", storage.read_table(source["store"]))
    with pytest.raises(PumaError, match=r"must be the prompts/ of a `prompts train` or `migrate` output"):
        check_source_model(SelectConfig(strategy="kmeans_loss"), [bare])
    headless = str(tmp_path / "run")  # a run directory without its head
    storage.write_table(f"{headless}/prompts/part-0.parquet", storage.read_table(source["store"]))
    with pytest.raises(PumaError, match=r"run/head.safetensors does not exist"):
        check_source_model(SelectConfig(strategy="loss_buckets"), [f"{headless}/prompts"])
    with pytest.raises(PumaError, match="takes one source store, not 2"):
        check_source_model(SelectConfig(strategy="ffn_kmeans"), [source["store"], source["store"]])
    moved = {"path": str(tmp_path / "nowhere")}
    with pytest.raises(PumaError, match="nowhere: cannot load model config"):
        check_source_model(SelectConfig(strategy="ffn_kmeans", source_model=moved), [source["store"]])
    with pytest.raises(PumaError, match="needs the source's training interactions"):
        select_users(SelectConfig(strategy="kmeans_loss"), source["store"], source["profile"], str(tmp_path / "s"))
    assert not storage.exists(str(tmp_path / "s"))


def test_migrate_checks_the_source_model_before_any_work(source, tiny_models, tmp_path):
    cfg = build(
        MigrateConfig,
        {
            "model": {"path": tiny_models["qwen2"]},
            "sources": [source["store"], source["store"]],
            "data": {"train": source["train"]},
            "output": str(tmp_path / "out"),
            "select": {"strategy": "kmeans_loss"},
            "evaluate": False,
        },
    )
    with pytest.raises(PumaError, match="'kmeans_loss' runs the source model, so it takes one source store, not 2"):
        migrate(cfg)
    assert not storage.exists(str(tmp_path / "out"))
