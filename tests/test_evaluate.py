import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray.data
from sklearn.metrics import roc_auc_score

from puma_ray import config as C
from puma_ray import storage
from puma_ray.baselines import BASELINES
from puma_ray.errors import PumaError
from puma_ray.evaluate import evaluate
from puma_ray.heads import build_head, save_head
from puma_ray.llm import FrozenLM
from puma_ray.metrics import auc, run_metrics, sorted_auc
from puma_ray.report import format_table
from puma_ray.schema import StoreMeta, write_prompt_store


def metrics_of(task: str, frame: pd.DataFrame, groups: tuple[str, ...] = (), blocks: int = 1) -> dict[str, dict]:
    """run_metrics of a pandas frame of scored rows (a "run" column added when it has none)."""
    frame = frame if "run" in frame else frame.assign(run="r")
    return run_metrics(task, ray.data.from_pandas(frame).repartition(blocks).materialize(), groups)


def test_rating_metrics_by_hand(ray_session):
    f = pd.DataFrame({"user_id": ["a", "a", "b"], "label": [1.0, 3.0, 5.0], "pred": [2.0, 3.0, 3.0]})
    m = metrics_of("rating", f)["r"]
    assert m["rmse"] == pytest.approx(math.sqrt((1 + 0 + 4) / 3)) and m["mae"] == pytest.approx(1.0)
    assert (m["rows"], m["users"]) == (3, 2)


def test_ctr_metrics_uauc_skips_one_class_users(ray_session):
    f = pd.DataFrame(
        {
            "user_id": ["a", "a", "a", "b", "b", "c"],
            "label": [1, 0, 0, 1, 0, 1],
            "pred": [0.9, 0.1, 0.95, 0.2, 0.8, 0.5],
        }
    )
    m = metrics_of("ctr", f)["r"]
    # user a: pairs (0.9>0.1 yes, 0.9>0.95 no) = 0.5; user b: 0.0; user c has one class
    assert m["uauc"] == pytest.approx(0.25) and m["uauc_users"] == 2
    assert m["auc"] == pytest.approx(roc_auc_score(f["label"], f["pred"]))
    assert (m["rows"], m["users"]) == (6, 3)


def scored_rows(task: str, rng, n: int = 600) -> pd.DataFrame:
    users = rng.integers(0, 30, n)
    label = rng.integers(1, 6, n).astype(float) if task == "rating" else (rng.random(n) < 0.4).astype(float)
    return pd.DataFrame(
        {
            "user_id": [f"u{u}" for u in users],
            "label": label,
            "pred": rng.integers(0, 10, n) / 10 + (label if task == "rating" else 0.2 * label),
            "in_g": users < 10,
        }
    )


@pytest.mark.parametrize("task", ["rating", "ctr"])
def test_subset_metrics_in_one_pass_equal_filtered(task, ray_session):
    """<metric>_in_g / _out_g, computed in the same passes as the whole set, equal the metrics of
    the filtered rows (g is a per-user flag, as evaluate's adapter_users subset)."""

    f = scored_rows(task, np.random.default_rng(1))
    both = metrics_of(task, f, ("g",), blocks=7)["r"]
    for side, part in (("in", f[f.in_g]), ("out", f[~f.in_g])):
        alone = metrics_of(task, part.drop(columns="in_g"))["r"]
        for k in ("rmse", "mae") if task == "rating" else ("auc", "uauc"):
            assert both[f"{k}_{side}_g"] == pytest.approx(alone[k], abs=1e-12), (k, side)
    whole = metrics_of(task, f.drop(columns="in_g"))["r"]
    assert all(both[k] == pytest.approx(v, abs=1e-12) for k, v in whole.items())


@pytest.mark.parametrize("task", ["rating", "ctr"])
def test_runs_measured_together_equal_each_run_alone(task, ray_session):
    """Several runs' rows, interleaved in the same blocks and measured in one set of passes, give
    each run the metrics, rows and users it gets alone (a run without rows is absent)."""

    rng = np.random.default_rng(2)
    runs = {name: scored_rows(task, rng, n).assign(run=name) for name, n in (("a", 600), ("b", 250), ("c", 40))}
    together = metrics_of(task, pd.concat(runs.values()).sample(frac=1, random_state=0), ("g",), blocks=5)
    assert set(together) == set(runs)
    for name, rows in runs.items():
        alone = metrics_of(task, rows, ("g",))[name]
        assert together[name].keys() == alone.keys()
        assert all(together[name][k] == pytest.approx(v, abs=1e-12) for k, v in alone.items()), name
        assert together[name]["rows"] == len(rows) and together[name]["users"] == rows.user_id.nunique()


@pytest.mark.parametrize("batch", [1, 3, 7, 1000])
def test_sorted_auc_is_exact_with_ties_across_batches(batch):
    rng = np.random.default_rng(0)
    pred = np.sort(rng.integers(0, 20, 500) / 20)  # many ties
    label = (rng.random(500) < 0.3 + 0.5 * pred).astype(float)
    batches = [{"pred": pred[i : i + batch], "label": label[i : i + batch]} for i in range(0, 500, batch)]
    assert sorted_auc(batches) == pytest.approx(roc_auc_score(label, pred), abs=1e-12)
    # the in-memory AUC a training worker's validation reports (unsorted rows): the same
    shuffled = rng.permutation(500)
    assert auc(label[shuffled], pred[shuffled]) == pytest.approx(roc_auc_score(label, pred), abs=1e-12)
    assert math.isnan(auc(np.ones(5), np.arange(5.0)))


def test_evaluate_runs_and_reports_unknown_users(tmp_path, tiny_models, rating_data, stage1_run, capsys):
    """A stage-1 output (the suite's stage-1 run) scored against baselines; valid rows of users
    without a prompt are counted."""

    out = stage1_run[0].output
    valid = pq.read_table(f"{rating_data}/valid")
    extra = valid.slice(0, 3).set_column(0, "user_id", pa.array(["stranger"] * 3)).cast(valid.schema)
    storage.write_table(str(tmp_path / "valid/part-0.parquet"), pa.concat_tables([valid, extra]))
    cfg = C.build(
        C.EvaluateConfig,
        {
            "model": {"path": tiny_models["llama"]},
            "data": {"train": f"{rating_data}/train", "valid": str(tmp_path / "valid")},
            "runs": {"source": out},
            "output": str(tmp_path / "report.json"),
        },
    )
    report = evaluate(cfg)
    src = report["methods"]["source"]
    assert src["unknown_rows"] == 3 and src["unknown_users"] == 1 and src["scored_rows"] == valid.num_rows
    assert src["lm_sample_passes"] > 0 and 0 < src["rmse"] < 4
    assert set(report["methods"]) == {"source", "global_mean", "user_mean", "bias"}
    assert report["methods"]["bias"]["scored_rows"] == valid.num_rows + 3 and 0 < report["methods"]["bias"]["rmse"] < 4
    assert report["methods"]["user_mean"]["scored_rows"] == valid.num_rows + 3
    assert storage.read_json(str(tmp_path / "report.json"))["methods"]["source"]["rmse"] == pytest.approx(src["rmse"])
    assert "| source |" in capsys.readouterr().out


def test_evaluate_refuses_store_of_other_model(tmp_path, tiny_models, rating_data, ray_session):
    lm = FrozenLM(tiny_models["qwen2"], "rating")
    meta = StoreMeta(
        model="qwen2",
        model_fingerprint=lm.fingerprint,
        hidden_size=96,
        prompt_length=1,
        template="rating_v1",
        stage="prompts",
    )
    run = str(tmp_path / "run")
    write_prompt_store(f"{run}/prompts", meta, ["u0000000"], np.zeros((1, 96), np.float32))
    save_head(run, build_head("rating", 96, C.HeadConfig()), "rating", C.HeadConfig().model_dump(), lm.fingerprint, 96)
    cfg = C.build(
        C.EvaluateConfig,
        {
            "model": {"path": tiny_models["llama"]},
            "baselines": [],
            "data": {"train": f"{rating_data}/train", "valid": f"{rating_data}/valid"},
            "runs": {"x": run},
        },
    )
    with pytest.raises(PumaError, match="made for model .qwen2."):
        evaluate(cfg)


def test_format_table():
    t = format_table(
        {"task": "ctr", "methods": {"a": {"auc": 0.61, "uauc": 0.55, "lm_sample_passes": 10, "wall_s": 1.0}}}
    )
    assert "| a | 0.6100 | 0.5500 | 10 | 1.0 | 0 |" in t


def _bias_reference(train: pd.DataFrame, valid: pd.DataFrame, sweeps: int, reg_u: float, reg_i: float):
    """The bias baseline by hand (numpy, in memory): ALS on mu + b_u + b_i, clipped to 1..5."""
    mu = train.label.mean()
    b_u = pd.Series(0.0, index=train.user_id.unique())
    for _ in range(sweeps):
        r = train.label - mu - train.user_id.map(b_u)
        g = r.groupby(train.item_id)
        b_i = g.sum() / (reg_i + g.count())
        r = train.label - mu - train.item_id.map(b_i)
        g = r.groupby(train.user_id)
        b_u = g.sum() / (reg_u + g.count())
    pred = mu + valid.user_id.map(b_u).fillna(0) + valid.item_id.map(b_i).fillna(0)
    return pred.clip(1, 5).to_numpy()


def test_bias_baseline_equals_als_by_hand(ray_session):
    """The streamed (Ray Data joins and groupbys) bias baseline gives the in-memory ALS's predictions,
    unseen users and items included, and recovers planted offsets."""
    rng = np.random.default_rng(0)
    users, items = [f"u{i}" for i in range(30)], [f"i{j}" for j in range(20)]
    b_u, b_i = dict(zip(users, rng.normal(0, 0.6, 30))), dict(zip(items, rng.normal(0, 0.4, 20)))
    rows = [(u, i) for u in users for i in items if rng.random() < 0.5]
    train = pd.DataFrame(rows, columns=["user_id", "item_id"])
    train["label"] = (3.2 + train.user_id.map(b_u) + train.item_id.map(b_i) + rng.normal(0, 0.1, len(train))).clip(1, 5)
    valid = pd.DataFrame(
        [(u, i) for u, i in zip(users, items * 2)] + [("new", "i0"), ("u0", "new")], columns=["user_id", "item_id"]
    )
    valid["label"] = 1 + np.arange(len(valid)) / 100  # unique: identifies each row after the joins
    cfg = C.EvaluateConfig(data={"train": "t"}, bias_sweeps=3, bias_reg_user=2.0, bias_reg_item=1.0)
    scored = BASELINES["bias"](
        ray.data.from_pandas(train),
        len(train),
        ray.data.from_pandas(valid),
        len(valid),
        float(train.label.mean()),
        "rating",
        cfg,
    ).to_pandas()
    want = _bias_reference(train, valid, 3, 2.0, 1.0)
    got = scored.set_index("label").loc[valid.label, "pred"].to_numpy()
    assert np.allclose(got, want, atol=1e-9)
    truth = (3.2 + valid.user_id.map(b_u) + valid.item_id.map(b_i)).iloc[:-2].clip(1, 5)
    assert np.sqrt(np.mean((want[:-2] - truth) ** 2)) < 0.15  # the offsets are recovered
