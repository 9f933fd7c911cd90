"""Per-user view of an evaluation: every method's error by user-activity decile, and the gate of a
migrated run: the users whose error under the migrated prompt exceeds the reference's (the source
prompt under the source model, or a baseline) by more than ``gate.max_regression``.

A user's error is the RMSE of their validation rows (ctr: their mean log loss). Streamed: the scored
rows of every method (run, user_id, label, pred; materialized) become error sums per (run, user)
(``data.sum_by``), joined with each user's training interactions (the activity); the gated run's
and the reference's sums are paired per user and written to GATE/users/ (every user with rows under
either, a verdict each) and GATE/flagged/ (the flagged), then reduced to counts and a histogram in
per-block passes. GATE/gate.json, written last, marks a complete gate. Nothing per user is collected
on the driver but the activity of at most ACTIVITY_SAMPLE users (a stable hash sample), for the
decile edges. A light module (no torch): its functions run in Ray tasks.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from ray.data import SaveMode

from puma_ray import outputs, storage
from puma_ray.config import GateConfig
from puma_ray.data import HELD, join_on, keep_hashed, sum_by, with_held

BINS = 40  # of the per-user change histogram drawn
FINE_BINS = 4000  # of the one its range, the median and the percentiles are read from
DECILES = 10
ACTIVITY_SAMPLE = 1_000_000  # users whose activity sets the decile edges (a stable hash sample above it)
PER_USER_METRIC = {"rating": "rmse", "ctr": "logloss"}
VERDICTS = ("flagged", "ok", "undecided", "missing")  # missing: rows under the run or the reference only


def _row_errors(batch: pa.Table, task: str) -> pa.Table:
    """Scored rows -> (run, user_id, e): squared error (rating) or log loss (ctr, pred clipped to (0, 1))."""
    pred = np.asarray(batch.column("pred"), np.float64)
    label = np.asarray(batch.column("label"), np.float64)
    if task == "rating":
        e = (pred - label) ** 2
    else:
        p = np.clip(pred, 1e-7, 1 - 1e-7)
        e = -(label * np.log(p) + (1 - label) * np.log1p(-p))
    return with_held(batch, {"run": batch.column("run"), "user_id": batch.column("user_id").cast(pa.string()), "e": e})


def _rows_held(batch: pa.Table, held: bool) -> pa.Table:
    """Row errors -> those held out (``held``) or those judged, without the HELD column."""
    mask = batch.column(HELD) if held else pc.invert(batch.column(HELD))
    return batch.filter(mask).drop_columns([HELD])


def _held_out(errors, metric: str, share: float) -> dict:
    """Every method's error on the held-out rows alone -> {"share", "metric", "methods": {run: {"error",
    "rows"}}}: rows that chose no user for the gated retrain (gate.holdout)."""
    sums = sum_by(errors.map_batches(_rows_held, fn_kwargs={"held": True}, batch_format="pyarrow"), ["run"], ["e"])
    sums = sums.to_pandas()
    err = error_of(sums["e"], sums["n"], metric)
    methods = {run: {"error": float(x), "rows": int(n)} for run, x, n in zip(sums["run"], err, sums["n"])}
    return {"share": share, "metric": metric, "methods": methods}


def error_of(e, rows, metric: str) -> np.ndarray:
    """Error sums -> the error: rmse sqrt(e / rows), logloss e / rows; NaN where rows == 0."""
    e, rows = np.asarray(e, np.float64), np.asarray(rows, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(rows > 0, e / rows, np.nan)
    return np.sqrt(mean) if metric == "rmse" else mean


def _rename(batch: pa.Table, names: dict[str, str]) -> pa.Table:
    return batch.rename_columns([names.get(c, c) for c in batch.column_names])


def _with_decile(batch: pa.Table, edges: list[float]) -> pa.Table:
    """(run, user_id, e, rows, activity | null) -> activity (0 for a user without training rows) and
    its decile (0..9: the bins of ``edges``' inner edges)."""
    act = np.nan_to_num(np.asarray(batch.column("activity").to_numpy(zero_copy_only=False), np.float64))
    decile = np.clip(np.searchsorted(np.asarray(edges[1:-1]), act, side="right"), 0, len(edges) - 2)
    batch = batch.drop_columns(["activity"])
    return batch.append_column("activity", pa.array(act.astype(np.int64))).append_column("decile", pa.array(decile))


def _pair(batch: pa.Table, run: str, reference: str) -> pa.Table:
    """(run, user_id, activity, e, rows) -> the gated run's and the reference's sums side by side
    (zeros on the other side; summed per user next), other methods' rows dropped."""
    name = batch.column("run").to_numpy(zero_copy_only=False)
    keep = (name == run) | (name == reference)
    batch = batch.filter(pa.array(keep))
    is_run = pa.array(name[keep] == run)
    e, rows = batch.column("e").combine_chunks(), batch.column("rows").combine_chunks()
    zero_e, zero_rows = pa.scalar(0.0, pa.float64()), pa.scalar(0, rows.type)
    return pa.table(
        {
            "user_id": batch.column("user_id"),
            "activity": batch.column("activity"),
            "e_run": pc.if_else(is_run, e, zero_e),
            "rows_run": pc.if_else(is_run, rows, zero_rows),
            "e_ref": pc.if_else(is_run, zero_e, e),
            "rows_ref": pc.if_else(is_run, zero_rows, rows),
        }
    )


def _verdicts(batch: pa.Table, metric: str, cfg: dict) -> pa.Table:
    """Per-user pairs -> GATE/users' rows: user_id, activity (training rows), rows (validation rows),
    error, reference_error, change (absolute: error - reference; relative: error / reference - 1),
    verdict (VERDICTS)."""
    rows_run = np.asarray(batch.column("rows_run"), np.int64)
    rows_ref = np.asarray(batch.column("rows_ref"), np.int64)
    err = error_of(batch.column("e_run"), rows_run, metric)
    ref = error_of(batch.column("e_ref"), rows_ref, metric)
    with np.errstate(invalid="ignore", divide="ignore"):
        change = (
            err - ref if cfg["mode"] == "absolute" else np.where(ref > 0, err / ref - 1, np.where(err > 0, np.inf, 0))
        )
    both = (rows_run > 0) & (rows_ref > 0)
    judged = both & (rows_run >= cfg["min_rows"])
    verdict = np.where(
        ~both, "missing", np.where(~judged, "undecided", np.where(change > cfg["max_regression"], "flagged", "ok"))
    )
    return pa.table(
        {
            "user_id": batch.column("user_id"),
            "activity": batch.column("activity"),
            "rows": pa.array(np.maximum(rows_run, rows_ref)),
            "error": err,
            "reference_error": ref,
            "change": np.where(both, change, np.nan),
            "verdict": pa.array(verdict, pa.string()),
        }
    )


def _capped_threshold(edges: np.ndarray, counts: np.ndarray, cap: int, threshold: float) -> float:
    """The smallest edge of the fine histogram (``edges``, ``counts`` of the finite changes) above
    ``threshold`` with at most ``cap`` changes beyond it: flagging only changes above it keeps at most
    ``cap`` users of the histogram (the worst)."""
    above = np.cumsum(counts[::-1])[::-1]  # above[k]: changes in bins k.. (>= edges[k])
    ok = np.flatnonzero((above <= max(cap, 0)) & (edges[:-1] >= threshold))
    return float(edges[ok[0]]) if len(ok) else float(edges[-1])


def _keep_verdict(batch: pa.Table, verdict: str) -> pa.Table:
    return batch.filter(pc.equal(batch.column("verdict"), verdict))


def _counts(batch: pa.Table) -> pa.Table:
    """A block of GATE/users rows -> one row: users per verdict, improved, and the judged users' change
    sum, min and max."""
    verdict = np.asarray(batch.column("verdict").to_numpy(zero_copy_only=False))
    change = np.asarray(batch.column("change"), np.float64)[(verdict == "flagged") | (verdict == "ok")]
    finite = change[np.isfinite(change)]
    row = {v: int((verdict == v).sum()) for v in VERDICTS}
    row.update(
        improved=int((change < 0).sum()),
        change_sum=float(finite.sum()),
        change_n=len(finite),
        change_min=float(finite.min()) if len(finite) else np.nan,
        change_max=float(finite.max()) if len(finite) else np.nan,
    )
    return pa.table({k: [v] for k, v in row.items()})


def _histogram(batch: pa.Table, edges: list[float]) -> pa.Table:
    """A block of GATE/users rows -> one row per bin: the judged users' finite changes counted in ``edges``."""
    verdict = np.asarray(batch.column("verdict").to_numpy(zero_copy_only=False))
    change = np.asarray(batch.column("change"), np.float64)[(verdict == "flagged") | (verdict == "ok")]
    edges = np.asarray(edges)
    counts, _ = np.histogram(np.clip(change[np.isfinite(change)], edges[0], edges[-1]), bins=edges)
    return pa.table({"bin": np.arange(len(counts)), "count": counts})


def _quantile(edges: np.ndarray, counts: np.ndarray, q: float) -> float:
    """The ``q`` quantile of a histogram, linear inside its bin (exact to a bin's width); NaN if empty."""
    total = counts.sum()
    if total == 0:
        return float("nan")
    cum = np.cumsum(counts)
    i = min(int(np.searchsorted(cum, q * total)), len(counts) - 1)
    before = cum[i - 1] if i else 0
    return float(edges[i] + (q * total - before) / max(counts[i], 1) * (edges[i + 1] - edges[i]))


def _display_edges(lo: float, hi: float, threshold: float) -> np.ndarray:
    """BINS (about) equal bins over [lo, hi] widened to hold 0 and ``threshold``, with ``threshold``
    on an edge (a bin is all flagged or all not)."""
    lo, hi = min(lo, 0.0, threshold), max(hi, 0.0, threshold)
    width = (hi - lo) / BINS if hi > lo else 1.0 / BINS
    first, last = math.floor((lo - threshold) / width), math.ceil((hi - threshold) / width)
    return threshold + width * np.arange(first, max(last, first + 1) + 1)


def _histogram_of(users, edges: np.ndarray) -> np.ndarray:
    """GATE/users (a Ray Dataset) -> its judged users' finite changes counted in ``edges`` (ends clipped)."""
    h = users.map_batches(_histogram, fn_kwargs={"edges": edges.tolist()}, batch_format="pyarrow", batch_size=None)
    bins = len(edges) - 1
    return h.to_pandas().groupby("bin")["count"].sum().reindex(range(bins), fill_value=0).to_numpy()


def _activity(train_ds):
    """Training rows -> (user_id, activity: the user's training rows), materialized."""
    sums = sum_by(train_ds.select_columns(["user_id"]), ["user_id"])
    return sums.map_batches(_rename, fn_kwargs={"names": {"n": "activity"}}, batch_format="pyarrow").materialize()


def _decile_edges(activity, users: int) -> list[float]:
    """The 0, 10, ..., 100th percentiles of the users' activity (from a stable hash sample of at most
    ACTIVITY_SAMPLE users), tied ones merged: fewer than 10 groups when many users share a value (an
    importer's cap on rows per user)."""
    fraction = min(1.0, ACTIVITY_SAMPLE / max(users, 1))
    sample = activity if fraction >= 1 else activity.map_batches(keep_hashed, fn_kwargs={"fraction": fraction})
    parts = [b["activity"] for b in sample.select_columns(["activity"]).iter_batches(batch_format="numpy")]
    values = np.concatenate(parts) if parts else np.zeros(1)
    edges = np.unique(np.quantile(values, np.linspace(0, 1, DECILES + 1)))  # tied edges (a cap on rows) merge
    return [float(x) for x in (edges if len(edges) > 1 else np.r_[edges, edges])]


def _by_decile(per_user, metric: str, groups: int) -> dict:
    """(run, user_id, e, rows, activity, decile) -> {run: {"value": [error per decile, None where no
    user], "users": [users per decile]}}: a decile's error pools its users' rows."""
    sums = sum_by(per_user, ["run", "decile"], ["e", "rows"]).to_pandas()
    out = {}
    for run, g in sums.groupby("run"):
        value, users = [None] * groups, [0] * groups
        for _, r in g.iterrows():
            value[int(r["decile"])] = float(error_of(r["e"], r["rows"], metric))
            users[int(r["decile"])] = int(r["n"])
        out[str(run)] = {"value": value, "users": users}
    return out


def _write(ds, uri: str) -> None:
    fs, path = storage.resolve(uri)
    ds.write_parquet(path, filesystem=fs, mode=SaveMode.OVERWRITE)


def _gate(per_user, metric: str, run: str, reference: str, cfg: GateConfig, out: str) -> dict:
    """Pairs the run's and the reference's per-user sums, writes OUT/users/ and OUT/flagged/, then
    OUT/gate.json (last) -> the gate's summary (puma_ray.report's "gate")."""
    paired = per_user.map_batches(_pair, fn_kwargs={"run": run, "reference": reference}, batch_format="pyarrow")
    pairs = sum_by(paired, ["user_id", "activity"], ["e_run", "rows_run", "e_ref", "rows_ref"]).materialize()

    def judge(threshold: float):  # GATE/users: one row per user, a verdict each
        settings = {**cfg.model_dump(), "max_regression": threshold}
        return pairs.map_batches(_verdicts, fn_kwargs={"metric": metric, "cfg": settings}, batch_format="pyarrow")

    users = judge(cfg.max_regression).materialize()
    c = users.map_batches(_counts, batch_format="pyarrow", batch_size=None).to_pandas()
    lo, hi = c["change_min"].min(), c["change_max"].max()
    if not np.isfinite(lo):
        lo, hi = 0.0, 0.0
    # a fine histogram over every change gives the median and the 1st/99th percentiles; the one drawn
    # spans those (outliers counted in its end bins), with the threshold on an edge
    fine_edges = np.linspace(lo, hi if hi > lo else lo + 1.0, FINE_BINS + 1)
    fine = _histogram_of(users, fine_edges)
    judged = int(c["flagged"].sum() + c["ok"].sum())
    n = int(c["change_n"].sum())
    threshold = cfg.max_regression
    if cfg.max_share is not None and c["flagged"].sum() > int(cfg.max_share * judged):
        threshold = _capped_threshold(fine_edges, fine, int(cfg.max_share * judged) - (judged - n), threshold)
        users = judge(threshold).materialize()
        c = users.map_batches(_counts, batch_format="pyarrow", batch_size=None).to_pandas()
    outputs.start_staging(out)  # users/ and flagged/ staged, published together, gate.json last
    _write(users, outputs.staged(out, "users"))
    _write(
        users.map_batches(_keep_verdict, fn_kwargs={"verdict": "flagged"}, batch_format="pyarrow"),
        outputs.staged(out, "flagged"),
    )
    q01, q99 = _quantile(fine_edges, fine, 0.01), _quantile(fine_edges, fine, 0.99)
    edges = _display_edges(q01 if np.isfinite(q01) else 0.0, q99 if np.isfinite(q99) else 0.0, threshold)
    counts = _histogram_of(users, edges)
    summary = {
        "run": run,
        "reference": reference,
        "metric": metric,
        "mode": cfg.mode,
        "max_regression": threshold,  # the one in effect: gate.max_regression, raised by gate.max_share
        "max_regression_set": cfg.max_regression,
        "max_share": cfg.max_share,
        "min_rows": cfg.min_rows,
        "users": judged + int(c["undecided"].sum()),
        "judged": judged,
        "undecided": int(c["undecided"].sum()),
        "missing": int(c["missing"].sum()),
        "flagged": int(c["flagged"].sum()),
        "flagged_share": int(c["flagged"].sum()) / judged if judged else 0.0,
        "improved": int(c["improved"].sum()),
        "mean_change": float(c["change_sum"].sum() / n) if n else float("nan"),
        "median_change": _quantile(fine_edges, fine, 0.5),
        # counts of the judged users' change; the end bins also hold the changes beyond them
        "histogram": {"edges": edges.tolist(), "counts": [int(x) for x in counts], "range": [float(lo), float(hi)]},
        "uri": out,
    }
    outputs.publish(out, ["users", "flagged"], retire=["gate.json"])
    storage.write_json(storage.join(out, "gate.json"), summary)
    return summary


def per_user(task: str, scored, train_ds, gate: tuple[str, str, GateConfig, str] | None, holdout: float = 0.0) -> dict:
    """The per-user part of an evaluation report. ``scored``: every method's rows (run, user_id,
    label, pred[, HELD]), materialized; ``train_ds``: the training interactions (their user_id:
    activity); ``gate``: (gated run, reference method, its config, output URI) or None; ``holdout``:
    the share of rows marked HELD (data.mark_held), measured apart and kept out of the rest.
    -> {"per_user": {"metric", "activity_deciles": {"edges", "methods"}}[, "gate": _gate's summary]
    [, "holdout": _held_out's]}."""
    metric = PER_USER_METRIC[task]
    errors = scored.map_batches(_row_errors, fn_kwargs={"task": task}, batch_format="pyarrow")
    held_out = None
    if holdout:  # two passes over the row errors: computed once
        errors = errors.materialize()
        held_out = _held_out(errors, metric, holdout)
        errors = errors.map_batches(_rows_held, fn_kwargs={"held": False}, batch_format="pyarrow")
    sums = sum_by(errors, ["run", "user_id"], ["e"])
    sums = sums.map_batches(_rename, fn_kwargs={"names": {"n": "rows"}}, batch_format="pyarrow").materialize()
    activity = _activity(train_ds)
    users = activity.count()
    edges = _decile_edges(activity, users)
    joined = join_on(sums, activity, "user_id", sums.count(), users * 48, how="left_outer")
    per_user_ds = joined.map_batches(_with_decile, fn_kwargs={"edges": edges}, batch_format="pyarrow").materialize()
    report = {
        "per_user": {
            "metric": metric,
            "activity_deciles": {"edges": edges, "methods": _by_decile(per_user_ds, metric, len(edges) - 1)},
        }
    }
    if gate is not None:
        run, reference, cfg, out = gate
        report["gate"] = _gate(per_user_ds, metric, run, reference, cfg, out)
    if held_out is not None:
        report["holdout"] = held_out
    return report
