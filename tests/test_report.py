"""`puma-ray report RUN`: the migration report (four PNGs + report.md) from a hand-built evaluation.json.

No Ray: the run directories are written here (summary.json + evaluation.json), as `puma-ray migrate` leaves them."""

from __future__ import annotations

import json

import matplotlib.image as mpimg
import pytest

from puma_ray.cli import main
from puma_ray.report import PLOTS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def rating_evaluation() -> dict:
    """A rating evaluation with per-user statistics, a gate and the flagged users' retraining."""

    def method(rmse, mae, inside, outside, passes, wall):
        return {
            "rmse": rmse,
            "mae": mae,
            "rmse_in_adapter_users": inside,
            "rmse_out_adapter_users": outside,
            "scored_rows": 4012,
            "unknown_rows": 0,
            "unknown_users": 0,
            "lm_sample_passes": passes,
            "wall_s": wall,
        }

    methods = {
        "puma": method(0.948012, 0.751234, 0.931177, 0.955561, 120000, 312.4),
        "puma_gated": method(0.944321, 0.749001, 0.931177, 0.950012, 123600, 353.6),
        "full_retrain": method(0.931804, 0.738765, 0.92551, 0.934442, 520000, 1204.9),
        "source": method(0.980123, 0.779912, 0.975, 0.98219, 510000, 1187.0),
        "random_init": method(1.052, 0.8451, 1.049, 1.0532, 0, 0.0),
        "global_mean": method(1.1203, 0.9402, 1.1188, 1.1209, 0, 0.0),
        "user_mean": method(1.0231, 0.8123, 1.0199, 1.0245, 0, 0.0),
        "bias": method(0.99871, 0.79012, 0.99502, 1.00011, 0, 0.0),
    }
    users = [41, 40, 40, 40, 40, 41, 40, 40, 40, 39]
    offsets = {"puma": 0.0, "puma_gated": -0.004, "full_retrain": -0.016, "source": 0.032}
    offsets.update({"random_init": 0.10, "global_mean": 0.17, "user_mean": 0.075, "bias": 0.05})
    deciles = {}
    for name, off in offsets.items():
        values = [round(1.12 - 0.021 * i + off, 6) for i in range(10)]
        deciles[name] = {"value": values, "users": users}
    deciles["random_init"]["value"][9] = None  # a decile without a user of that method
    deciles["random_init"]["users"] = [41, 40, 40, 40, 40, 41, 40, 40, 40, 0]
    counts = [0, 1, 2, 4, 9, 18, 35, 61, 80, 71, 50, 30, 19, 8, 5, 3, 2, 1, 1, 0]
    return {
        "task": "rating",
        "valid": "s3://bucket/movielens/valid",
        "methods": methods,
        "timings": {"wall_s": 96.3, "loop_s": 71.2},
        "per_user": {
            "metric": "rmse",
            "activity_deciles": {"edges": [20, 23, 27, 31, 36, 42, 49, 58, 66, 76, 85], "methods": deciles},
        },
        "gate": {
            "run": "puma",
            "reference": "source",
            "metric": "rmse",
            "mode": "absolute",
            "max_regression": 0.05,
            "min_rows": 3,
            "users": 405,
            "judged": 400,
            "undecided": 5,
            "flagged": 12,
            "flagged_share": 0.03,
            "improved": 251,
            "mean_change": -0.012345,
            "median_change": -0.004021,
            "histogram": {"edges": [round(-0.3 + 0.025 * i, 3) for i in range(21)], "counts": counts},
            "uri": "s3://bucket/runs/m1/gate",
        },
        "holdout": {
            "share": 0.5,
            "metric": "rmse",
            "methods": {
                name: {"error": round(m["rmse"] + 0.0061, 6), "rows": 2006}
                for name, m in methods.items()
                if name in ("puma", "puma_gated", "full_retrain", "user_mean")
            },
        },
        "retrain": {
            "users": 12,
            "run": "s3://bucket/runs/m1/gate/retrain",
            "lm_sample_passes": 3600,
            "wall_s": 41.2,
            "method": "puma_gated",
        },
    }


def ctr_evaluation() -> dict:
    """A ctr evaluation of an older run: no per-user statistics, no gate."""

    def method(auc, uauc, passes, subsets=True):
        m = {"auc": auc, "uauc": uauc, "scored_rows": 900, "unknown_rows": 3, "unknown_users": 1}
        if subsets:
            m.update(auc_in_adapter_users=auc + 0.01, auc_out_adapter_users=auc - 0.004)
        return {**m, "lm_sample_passes": passes, "wall_s": 12.5}

    return {
        "task": "ctr",
        "valid": "/data/ctr/valid",
        "methods": {
            "puma": method(0.71234, 0.65432, 40000),
            "full_retrain": method(0.72001, 0.66012, 90000),
            "global_mean": method(0.5, 0.5, 0, subsets=False),
        },
        "timings": {"wall_s": 20.0, "loop_s": 11.0},
    }


def migrated_run(path, evaluation: dict | None, stage: str = "migrate"):
    """A run directory as `puma-ray migrate` leaves it: summary.json and evaluation.json."""
    path.mkdir(parents=True)
    (path / "summary.json").write_text(json.dumps({"stage": stage, "lm_sample_passes": 120000}))
    if evaluation is not None:
        (path / "evaluation.json").write_text(json.dumps(evaluation))
    return path


def tables(md: str) -> list[list[list[str]]]:
    """Every Markdown table of ``md``: its rows of cells, header first, the rule line left out."""
    found, rows = [], []
    for line in [*md.splitlines(), ""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(c and set(c) <= set("-:") for c in cells):
                rows.append(cells)
        elif rows:
            found.append(rows)
            rows = []
    return found


def keyed(table: list[list[str]]) -> dict[str, dict[str, str]]:
    """First column -> {header: cell}."""
    head = table[0]
    return {row[0]: dict(zip(head, row)) for row in table[1:]}


def check_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    img = mpimg.imread(path)
    assert img.shape[0] > 300 and img.shape[1] > 500
    assert img.std() > 0.05  # not a blank canvas


def test_rating_report(tmp_path, capsys):
    ev = rating_evaluation()
    run = migrated_run(tmp_path / "run", ev)
    assert main(["report", str(run)]) == 0
    out = run / "report"
    assert f"report: {out}/report.md and 4 plot(s)" in capsys.readouterr().err
    for name in PLOTS:
        check_png(out / name)
    md = (out / "report.md").read_text()
    for name in PLOTS:
        assert f"]({name})" in md
    assert "skipped" not in md

    found = tables(md)
    methods = keyed(next(t for t in found if t[0][:3] == ["method", "RMSE", "MAE"]))
    assert list(methods) == list(ev["methods"])
    for name, m in ev["methods"].items():
        row = methods[name]
        assert row["RMSE"] == f"{m['rmse']:.4f}" and row["MAE"] == f"{m['mae']:.4f}"
        assert row["RMSE in adapter_users"] == f"{m['rmse_in_adapter_users']:.4f}"
        assert row["RMSE out adapter_users"] == f"{m['rmse_out_adapter_users']:.4f}"
        assert int(row["LM sample-passes"].replace(",", "")) == m["lm_sample_passes"]

    gate = {k: v["value"] for k, v in keyed(next(t for t in found if t[0] == ["gate", "value"])).items()}
    for key in ("users", "judged", "undecided", "flagged", "improved", "min_rows"):
        label = "min valid rows per user" if key == "min_rows" else "users (under both)" if key == "users" else key
        assert gate[label] == str(ev["gate"][key])
    assert gate["reference"] == "source" and gate["threshold (max_regression)"] == "0.0500"
    assert gate["mean change"] == "-0.0123" and gate["median change"] == "-0.0040"
    assert gate["flagged share"] == "3.00%" and gate["flagged users listed in"] == f"`{ev['gate']['uri']}`"

    values, users = [keyed(t) for t in found if t[0][0] == "method" and t[0][1].startswith("1: ")]
    edges = ev["per_user"]["activity_deciles"]["edges"]
    assert list(values["puma"])[1:] == [f"{i + 1}: {edges[i]}–{edges[i + 1]}" for i in range(10)]
    for name, m in ev["per_user"]["activity_deciles"]["methods"].items():
        assert list(values[name].values())[1:] == ["—" if v is None else f"{v:.4f}" for v in m["value"]]
        assert list(users[name].values())[1:] == [str(u) for u in m["users"]]

    verdict = md.split("## Verdict", 1)[1].split("##", 1)[0]
    assert "puma: RMSE 0.9480 vs full_retrain 0.9318 (1.017x) at 23% of its LM sample-passes" in verdict
    assert "gate: 12 of 400 judged users (3.0%) worse by more than 0.0500 RMSE than under source" in verdict
    assert "5 undecided" in verdict
    gated = "after retraining the flagged users: puma_gated RMSE 0.9443 (+3,600 LM sample-passes): "
    assert gated + "1.013x full_retrain at 24% of its LM sample-passes." in verdict
    assert "Retrained: the 12 flagged users, as method puma_gated" in md and "3,600 LM sample-passes" in md

    held = ev["holdout"]["methods"]  # every method measured on the rows held out of the gate
    rows = keyed(next(t for t in found if t[0][:2] == ["method", "RMSE on held-out rows"]))
    assert list(rows) == [m for m in ev["methods"] if m in held]
    for name, m in held.items():
        ratio = m["error"] / held["full_retrain"]["error"]
        assert [rows[name]["RMSE on held-out rows"], rows[name]["/ full_retrain"]] == [
            f"{m['error']:.4f}",
            f"{ratio:.4f}",
        ]
        assert rows[name]["held-out rows"] == "2,006"
    ratio = held["puma_gated"]["error"] / held["full_retrain"]["error"]
    assert f"on the validation rows held out of the gate: {ratio:.3f}x full_retrain." in verdict


def test_ctr_report_without_gate_skips_its_plots(tmp_path, capsys):
    """An older run (no per_user, no gate) to an --out that holds an earlier report: the plots it cannot
    draw are skipped, said so in report.md, and the earlier ones of those names removed."""
    out = tmp_path / "elsewhere"
    assert main(["report", str(migrated_run(tmp_path / "old", rating_evaluation())), "--out", str(out)]) == 0
    ev = ctr_evaluation()
    assert main(["report", str(migrated_run(tmp_path / "run", ev)), "--out", str(out)]) == 0
    assert "skipped: gate_change.png, activity_deciles.png" in capsys.readouterr().err
    assert not (out / "gate_change.png").exists() and not (out / "activity_deciles.png").exists()
    check_png(out / "adapter_users.png")
    check_png(out / "quality_cost.png")
    md = (out / "report.md").read_text()
    assert "_gate_change.png skipped: no per-user gate in evaluation.json._" in md
    assert "_activity_deciles.png skipped: no per-user statistics" in md
    assert "](gate_change.png)" not in md and "](adapter_users.png)" in md and "](quality_cost.png)" in md
    methods = keyed(next(t for t in tables(md) if t[0][:3] == ["method", "AUC", "UAUC"]))
    for name, m in ev["methods"].items():
        assert methods[name]["AUC"] == f"{m['auc']:.4f}" and methods[name]["UAUC"] == f"{m['uauc']:.4f}"
    assert "puma: AUC 0.7123 vs full_retrain 0.7200" in md and "gate: not computed" in md


def _not_migrated(tmp_path):
    return migrated_run(tmp_path / "run", rating_evaluation(), stage="prompts"), "not a migrated run"


def _no_evaluation(tmp_path):
    return migrated_run(tmp_path / "run", None), "no evaluation.json"


def _empty_dir(tmp_path):
    (tmp_path / "run").mkdir()
    return tmp_path / "run", "not a migrated run"


def _missing(tmp_path):
    return tmp_path / "nowhere", "not found"


def _broken_json(tmp_path):
    run = migrated_run(tmp_path / "run", None)
    (run / "evaluation.json").write_text('{"task": "rating", "methods": {')
    return run, "evaluation.json: not valid JSON"


def _no_methods(tmp_path):
    return migrated_run(
        tmp_path / "run", {"task": "rating", "valid": "v"}
    ), 'evaluation.json: not an evaluation report (no "methods")'


def _malformed_gate(tmp_path):
    ev = rating_evaluation()
    del ev["gate"]["flagged"]
    return migrated_run(tmp_path / "run", ev), "evaluation.json: malformed evaluation report (KeyError: 'flagged')"


@pytest.mark.parametrize(
    "case", [_not_migrated, _no_evaluation, _empty_dir, _missing, _broken_json, _no_methods, _malformed_gate]
)
def test_bad_run_is_one_line_error(tmp_path, capsys, case):
    run, problem = case(tmp_path)
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {run}") and problem in err
    assert err.count("\n") == 1 and "Traceback" not in err
