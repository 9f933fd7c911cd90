"""The per-user gate (puma_ray.gate) on hand-made scored rows, checked against numpy, and the gated
retrain end to end (migrate ... gate.retrain=true on the tiny models): the final store is the migrated
store with exactly the flagged users replaced, its cost adds the retrain's, and the report agrees
with evaluation.json."""

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray.data
from safetensors.numpy import load_file
from test_migrate import FAST

from puma_ray import config as C
from puma_ray.cli import main
from puma_ray.data import mark_held
from puma_ray.gate import per_user
from puma_ray.pipeline import migrate
from puma_ray.schema import read_prompt_store

# user -> (valid labels, puma's predictions, source's predictions); u3 has one valid row, u4 no source row
ROWS = {
    "u0": ([4, 4, 4], [3, 3, 3], [4, 4, 4]),  # puma RMSE 1, source 0: flagged
    "u1": ([5, 1, 3], [4, 2, 3], [3, 3, 3]),  # puma 0.816, source 1.633: improved
    "u2": ([2, 2, 2, 2], [2.5, 2.5, 2.5, 2.5], [2.45, 2.45, 2.45, 2.45]),  # +0.05: within 0.1
    "u3": ([3], [5], [3]),  # one row: undecided
    "u4": ([1, 2], [1, 2], None),  # no source row: missing
}
ACTIVITY = {"u0": 2, "u1": 4, "u2": 6, "u3": 8, "u4": 10}  # training rows per user


def _scored() -> pa.Table:
    cols = {"run": [], "user_id": [], "label": [], "pred": []}
    for user, (labels, puma, source) in ROWS.items():
        for run, preds in (("puma", puma), ("source", source)):
            for label, pred in zip(labels, preds or []):
                cols["run"].append(run)
                cols["user_id"].append(user)
                cols["label"].append(float(label))
                cols["pred"].append(float(pred))
    return pa.table(cols)


def _rmse(labels, preds) -> float:
    return math.sqrt(np.mean((np.asarray(preds, float) - np.asarray(labels, float)) ** 2))


@pytest.mark.parametrize("mode", ["absolute", "relative"])
def test_gate_flags_counts_and_deciles_match_numpy(tmp_path, ray_session, mode):
    scored = ray.data.from_arrow(_scored())
    train = ray.data.from_items([{"user_id": u} for u, n in ACTIVITY.items() for _ in range(n)])
    threshold = 0.1 if mode == "absolute" else 0.2  # u2: +0.05 absolute, +11% relative
    cfg = C.GateConfig(mode=mode, max_regression=threshold, min_rows=2)
    out = str(tmp_path / "gate")
    report = per_user("rating", scored, train, ("puma", "source", cfg, out))

    gate = report["gate"]
    assert (gate["users"], gate["judged"], gate["undecided"], gate["missing"]) == (4, 3, 1, 1)
    assert (gate["flagged"], gate["improved"]) == (1, 1)
    assert gate["flagged_share"] == pytest.approx(1 / 3)
    assert sum(gate["histogram"]["counts"]) == gate["judged"] - (mode == "relative")  # u0: 1/0 - 1 = inf
    assert np.abs(np.asarray(gate["histogram"]["edges"]) - threshold).min() < 1e-12  # a bin is flagged or not
    assert json.load(open(f"{out}/gate.json")) == json.loads(json.dumps(gate))

    users = pq.read_table(f"{out}/users").to_pandas().set_index("user_id")
    verdict = {"u0": "flagged", "u1": "ok", "u2": "ok", "u3": "undecided", "u4": "missing"}
    assert users["verdict"].to_dict() == verdict
    for u, (labels, puma, source) in ROWS.items():
        assert users.loc[u, "error"] == pytest.approx(_rmse(labels, puma))
        assert users.loc[u, "rows"] == len(labels) and users.loc[u, "activity"] == ACTIVITY[u]
        if source is not None:
            ref = _rmse(labels, source)
            change = (
                _rmse(labels, puma) - ref if mode == "absolute" else _rmse(labels, puma) / ref - 1 if ref else np.inf
            )
            assert users.loc[u, "reference_error"] == pytest.approx(ref)
            assert users.loc[u, "change"] == pytest.approx(change)
    assert pq.read_table(f"{out}/flagged").column("user_id").to_pylist() == ["u0"]

    deciles = report["per_user"]["activity_deciles"]
    edges = np.quantile(list(ACTIVITY.values()), np.linspace(0, 1, 11))
    assert deciles["edges"] == pytest.approx(edges.tolist())
    for run in ("puma", "source"):
        got = deciles["methods"][run]
        for d in range(10):  # a decile pools its users' rows
            mine = [u for u, n in ACTIVITY.items() if min(np.searchsorted(edges[1:-1], n, side="right"), 9) == d]
            rows = [(lab, p) for u in mine for lab, p in zip(ROWS[u][0], ROWS[u][1 if run == "puma" else 2] or [])]
            assert got["users"][d] == len({u for u in mine if ROWS[u][1 if run == "puma" else 2]})
            if rows:
                assert got["value"][d] == pytest.approx(_rmse(*zip(*rows)))
            else:
                assert got["value"][d] is None


def test_max_share_keeps_only_the_worst_users_flagged(tmp_path, ray_session):
    """gate.max_share: ten users 0.1 .. 1.0 worse (absolute), all past max_regression; at most 30%
    flagged: the three worst, and the threshold in effect lies between the 4th and the 3rd worst."""
    rows = {"run": [], "user_id": [], "label": [], "pred": []}
    for u in range(10):
        for run, off in (("puma", 0.1 * (u + 1)), ("source", 0.0)):
            for label in (2.0, 3.0, 4.0):
                rows["run"].append(run)
                rows["user_id"].append(f"u{u}")
                rows["label"].append(label)
                rows["pred"].append(label + off)
    train = ray.data.from_items([{"user_id": f"u{u}"} for u in range(10)])
    cfg = C.GateConfig(mode="absolute", max_regression=0.05, min_rows=1, max_share=0.3)
    out = str(tmp_path / "gate")
    gate = per_user("rating", ray.data.from_arrow(pa.table(rows)), train, ("puma", "source", cfg, out))["gate"]
    assert sorted(pq.read_table(f"{out}/flagged").column("user_id").to_pylist()) == ["u7", "u8", "u9"]
    assert (gate["flagged"], gate["judged"], gate["max_share"], gate["max_regression_set"]) == (3, 10, 0.3, 0.05)
    assert 0.7 - 1e-9 <= gate["max_regression"] < 0.8
    users = pq.read_table(f"{out}/users").to_pandas().set_index("user_id")
    assert (users["verdict"] == "flagged").sum() == 3 and users.loc["u6", "verdict"] == "ok"


def test_held_out_rows_are_measured_apart_and_never_judged(tmp_path, ray_session):
    """gate.holdout: the verdict and the per-user tables use the rows not held; every method's error on
    the held rows alone is reported (pooled: sqrt of their mean squared error)."""
    rows = _scored()
    held = np.zeros(rows.num_rows, bool)
    user = np.asarray(rows.column("user_id").to_pylist())
    held[user == "u0"] = np.arange((user == "u0").sum()) % 3 != 0  # u0 keeps one judged row per run
    held[user == "u1"] = True  # u1 is held out whole: no verdict, only the held-out measurement
    rows = rows.append_column("held", pa.array(held))
    train = ray.data.from_items([{"user_id": u} for u, n in ACTIVITY.items() for _ in range(n)])
    cfg = C.GateConfig(mode="absolute", max_regression=0.1, min_rows=1)
    report = per_user("rating", ray.data.from_arrow(rows), train, ("puma", "source", cfg, str(tmp_path / "g")), 0.5)

    users = pq.read_table(f"{tmp_path}/g/users").to_pandas().set_index("user_id")
    assert "u1" not in users.index and users.loc["u0", "rows"] == 1 and users.loc["u0", "verdict"] == "flagged"
    table = rows.to_pandas()
    for run in ("puma", "source"):
        mine = table[(table.run == run) & table.held]
        expect = math.sqrt(np.mean((mine.pred - mine.label) ** 2))
        assert report["holdout"]["methods"][run] == {"error": pytest.approx(expect), "rows": len(mine)}
    assert report["holdout"]["share"] == 0.5 and report["holdout"]["metric"] == "rmse"


def test_ctr_per_user_error_is_log_loss(tmp_path, ray_session):
    rows = pa.table(
        {
            "run": ["puma", "puma", "source", "source"],
            "user_id": ["a", "a", "a", "a"],
            "label": [1.0, 0.0, 1.0, 0.0],
            "pred": [0.6, 0.3, 0.9, 0.2],
        }
    )
    cfg = C.GateConfig(mode="absolute", max_regression=0.0, min_rows=1)
    out = str(tmp_path / "gate")
    report = per_user(
        "ctr", ray.data.from_arrow(rows), ray.data.from_items([{"user_id": "a"}]), ("puma", "source", cfg, out)
    )
    users = pq.read_table(f"{out}/users").to_pandas()
    assert report["gate"]["metric"] == "logloss" and report["gate"]["flagged"] == 1
    assert users["error"][0] == pytest.approx(-(math.log(0.6) + math.log(0.7)) / 2)
    assert users["reference_error"][0] == pytest.approx(-(math.log(0.9) + math.log(0.8)) / 2)


def test_migrate_gate_retrain_replaces_only_the_flagged_users(tmp_path, tiny_models, rating_data, stage1_run, capsys):
    source_cfg, _ = stage1_run
    cfg = C.build(
        C.MigrateConfig,
        C.deep_merge(
            FAST,
            {
                "model": {"path": tiny_models["qwen2"]},
                "sources": [f"{source_cfg.output}/prompts"],
                "output": str(tmp_path / "puma"),
                "data": {"train": f"{rating_data}/train", "valid": f"{rating_data}/valid"},
                "select": {"budget": 20, "clusters": 3, "min_per_cluster": 2},
                "baselines": ["user_mean"],
                # threshold 0: every user whose error rose is retrained
                # half of the valid rows held out of the verdict and measured apart (gate.holdout)
                "gate": {
                    "mode": "absolute",
                    "max_regression": 0.0,
                    "holdout": 0.5,
                    "retrain": True,
                    "train": {"epochs": 1},
                },
                "run": {"name": "gate", "storage_path": str(tmp_path / "ray")},
            },
        ),
    )
    evaluation = migrate(cfg)["evaluation"]
    out = cfg.output
    gate, retrain = evaluation["gate"], evaluation["retrain"]
    assert gate["reference"] == "source" and "source" in evaluation["methods"]  # scored as its own run
    flagged = sorted(pq.read_table(f"{out}/gate/flagged").column("user_id").to_pylist())
    assert 0 < len(flagged) == gate["flagged"] == retrain["users"] < gate["judged"]

    # the final store: every migrated user once; the flagged ones from the retrain, the others untouched
    _, ids, migrated = read_prompt_store(f"{out}/prompts")
    _, retrained_ids, retrained = read_prompt_store(f"{out}/gate/retrain/prompts")
    _, final_ids, final = read_prompt_store(f"{out}/gated/prompts")
    assert sorted(retrained_ids) == flagged and sorted(final_ids) == sorted(ids)
    before, after, new = dict(zip(ids, migrated)), dict(zip(final_ids, final)), dict(zip(retrained_ids, retrained))
    for user in ids:
        np.testing.assert_array_equal(after[user], new[user] if user in new else before[user])
    assert any(not np.array_equal(new[u], before[u]) for u in flagged)  # the retrain trained them
    assert json.load(open(f"{out}/gated/manifest.json"))["replaced"] == len(flagged)
    # the head stayed the migrated one (head_lr 0), and the final run scores with it
    for name, tensor in load_file(f"{out}/head.safetensors").items():
        np.testing.assert_array_equal(load_file(f"{out}/gate/retrain/head.safetensors")[name], tensor)
        np.testing.assert_array_equal(load_file(f"{out}/gated/head.safetensors")[name], tensor)

    methods = evaluation["methods"]
    retrain_passes = json.load(open(f"{out}/gate/retrain/summary.json"))["lm_sample_passes"]
    assert methods["puma_gated"]["lm_sample_passes"] == methods["puma"]["lm_sample_passes"] + retrain_passes
    assert set(evaluation["per_user"]["activity_deciles"]["methods"]) == set(methods)
    on_disk = json.load(open(f"{out}/evaluation.json"))
    assert on_disk["methods"]["puma_gated"] == methods["puma_gated"] and on_disk["retrain"] == retrain

    # the report: written by migrate, redrawn from the JSON alone by `puma-ray report`
    report_md = open(f"{out}/report/report.md").read()
    for name in ("gate_change", "activity_deciles", "adapter_users", "quality_cost"):
        assert f"({name}.png)" in report_md
        assert open(f"{out}/report/{name}.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert f"| puma_gated | {methods['puma_gated']['rmse']:.4f} |" in report_md
    # the held-out rows: every method measured on them, the same rows for each (a hash of user and
    # item), user_mean's error there as numpy computes it from the data
    held_out = evaluation["holdout"]["methods"]
    assert set(held_out) == set(methods) and len({m["rows"] for m in held_out.values()}) == 1
    train, valid = (pq.read_table(f"{rating_data}/{s}").to_pandas() for s in ("train", "valid"))
    valid = valid[mark_held(pa.Table.from_pandas(valid), 0.5).column("held").to_numpy()]
    pred = valid.user_id.map(train.groupby("user_id").label.mean()).fillna(train.label.mean())
    assert held_out["user_mean"]["rows"] == len(valid) and 0 < len(valid) < methods["puma"]["scored_rows"]
    assert held_out["user_mean"]["error"] == pytest.approx(math.sqrt(np.mean((pred - valid.label) ** 2)))
    g = held_out["puma_gated"]
    assert f"| puma_gated | {g['error']:.4f} | — | {g['rows']:,} |" in report_md  # no full_retrain here
    capsys.readouterr()
    assert main(["report", out, "--out", str(tmp_path / "again")]) == 0
    assert open(tmp_path / "again" / "report.md").read() == report_md
