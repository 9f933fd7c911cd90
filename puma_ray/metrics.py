"""Metrics of scored rows (run, user_id, label, pred[, in_<subset>...]) as Ray Datasets, streamed,
every run (method) in the same passes.

rating -> RMSE, MAE from per-batch error sums; ctr -> exact AUC over one distributed sort by (run,
pred), uAUC = mean per-user AUC over users with both classes (scikit-learn per user, one groupby).
For each subset g the same metrics inside (``<metric>_in_<g>``) and outside (``_out_<g>``) it, in
the same passes. Nothing per row is collected. A light module on purpose: its functions run in Ray tasks,
which import it (no torch, no transformers).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from puma_ray.data import compact, shuffle_partitions, sum_by, with_held


def _sides(groups) -> list[str]:
    """Metric-name suffixes of the row selections: "" every row, "_in_<g>" / "_out_<g>" rows whose
    boolean column ``in_<g>`` is true / false."""
    return ["", *(f"_{side}_{g}" for g in groups for side in ("in", "out"))]


def _masks(batch, groups) -> dict[str, np.ndarray | None]:
    """One batch (pyarrow, pandas or numpy dict) -> {suffix of :func:`_sides`: row mask (None = every row)}."""
    out: dict = {"": None}
    for g in groups:
        flag = np.asarray(batch[f"in_{g}"], bool)
        out[f"_in_{g}"], out[f"_out_{g}"] = flag, ~flag
    return out


def _error_sums(batch: pa.Table, groups=()) -> pa.Table:
    """Per run of the batch, one row: run, then n, se, ae of every row selection of :func:`_masks`
    (column suffixes)."""
    err = np.asarray(batch.column("pred"), np.float64) - np.asarray(batch.column("label"), np.float64)
    cols = {"run": batch.column("run")}
    for side, m in _masks(batch, groups).items():
        keep = np.ones(len(err), bool) if m is None else m
        cols.update({f"n{side}": keep.astype(np.int64), f"se{side}": np.where(keep, err**2, 0.0)})
        cols[f"ae{side}"] = np.where(keep, np.abs(err), 0.0)
    return _sum_by_run(pa.table(cols))


def _sum_by_run(table: pa.Table) -> pa.Table:
    """Every column but ``run`` summed per run: one row per run, same column names."""
    names = [c for c in table.column_names if c != "run"]
    sums = table.group_by("run").aggregate([(c, "sum") for c in names])
    return sums.select(["run", *(f"{c}_sum" for c in names)]).rename_columns(["run", *names])


def _by_run(parts) -> pd.DataFrame:
    """Per-block partial sums (a Ray Dataset of :func:`_sum_by_run` rows) -> their totals per run."""
    frame = parts.to_pandas()
    return frame.groupby("run").sum() if len(frame) else pd.DataFrame()


class SortedAUC:
    """Exact ROC AUC (ties count 1/2), fed batches in ascending pred order, one batch in memory:
    AUC = sum over positives of (negatives below + half the tied negatives) / (P * N)."""

    def __init__(self):
        self.negs_below = self.pairs = 0.0
        self.pos_total = self.neg_total = 0
        self.carry = None  # (value, positives, negatives) of the last tie group, which may continue in the next batch

    def add(self, pred, label) -> None:
        """pred (B,) ascending, continuing the previous batches; label (B,) 0/1."""
        pred, lab = np.asarray(pred, np.float64), np.asarray(label) > 0.5
        if len(pred) == 0:
            return
        vals, start = np.unique(pred, return_index=True)
        pos = np.add.reduceat(lab.astype(np.int64), start)
        neg = np.add.reduceat((~lab).astype(np.int64), start)
        if self.carry is not None and vals[0] == self.carry[0]:
            pos[0] += self.carry[1]
            neg[0] += self.carry[2]
        elif self.carry is not None:
            vals, pos, neg = np.r_[self.carry[0], vals], np.r_[self.carry[1], pos], np.r_[self.carry[2], neg]
        below = self.negs_below + np.cumsum(neg) - neg
        self.pairs += float((pos[:-1] * (below[:-1] + 0.5 * neg[:-1])).sum())
        self.negs_below = float(below[-1])
        self.pos_total += int(pos[:-1].sum())
        self.neg_total += int(neg[:-1].sum())
        self.carry = (vals[-1], int(pos[-1]), int(neg[-1]))

    def rows(self) -> int:
        return self.pos_total + self.neg_total + (self.carry[1] + self.carry[2] if self.carry else 0)

    def value(self) -> float:
        pairs, p, n = self.pairs, self.pos_total, self.neg_total
        if self.carry is not None:
            pairs += self.carry[1] * (self.negs_below + 0.5 * self.carry[2])
            p += self.carry[1]
            n += self.carry[2]
        return pairs / (p * n) if p and n else float("nan")


def error_metrics(se: float, ae: float, n: float) -> dict[str, float]:
    """Rating metrics from error sums over ``n`` rows: {"rmse": sqrt(se / n), "mae": ae / n}."""
    return {"rmse": math.sqrt(se / n), "mae": float(ae / n)}


def auc(label: np.ndarray, pred: np.ndarray) -> float:
    """Exact ROC AUC of rows held in memory (a training worker's validation rows); NaN without both
    classes (see SortedAUC)."""
    order = np.argsort(np.asarray(pred, np.float64), kind="stable")
    return sorted_auc([{"pred": np.asarray(pred)[order], "label": np.asarray(label)[order]}])


def sorted_auc(batches) -> float:
    """Exact ROC AUC of batches ({"pred", "label"}) sorted by pred ascending (see SortedAUC)."""
    auc = SortedAUC()
    for b in batches:
        auc.add(b["pred"], b["label"])
    return auc.value()


def _user_auc(group: pd.DataFrame, groups=()) -> pd.DataFrame:
    """One user's rows of one run -> (run, auc_sum, users, seen[, in_<g>]): their AUC and users = 1, or
    0 and 0 when they have one class only; seen = 1; the user's subset flags are carried along."""
    from sklearn.metrics import roc_auc_score  # noqa: PLC0415 -- 1.7 s per worker process; CTR's uAUC only

    y = group["label"].to_numpy() > 0.5
    both = 0 < y.sum() < len(y)
    return pd.DataFrame(
        {
            "run": [group["run"].iloc[0]],
            "auc_sum": [float(roc_auc_score(y, group["pred"].to_numpy())) if both else 0.0],
            "users": [int(both)],
            "seen": [1],
            **{f"in_{g}": [bool(group[f"in_{g}"].iloc[0])] for g in groups},
        }
    )


def _uauc_sums(batch: pa.Table, groups=()) -> pa.Table:
    """Rows of :func:`_user_auc` -> per run of the block: seen, auc_sum and users of every row selection."""
    cols = {"run": batch.column("run"), "seen": batch.column("seen")}
    auc, users = np.asarray(batch.column("auc_sum"), np.float64), np.asarray(batch.column("users"), np.int64)
    for side, m in _masks(batch, groups).items():
        cols.update(
            {f"auc_sum{side}": auc if m is None else auc * m, f"users{side}": users if m is None else users * m}
        )
    return _sum_by_run(pa.table(cols))


def _users_by_run(batch: pa.Table) -> pa.Table:
    """Rows of sums per (run, user_id) -> per run of the block, its distinct users."""
    return _sum_by_run(pa.table({"run": batch.column("run"), "users": np.ones(batch.num_rows, np.int64)}))


def run_metrics(task: str, ds, groups: tuple[str, ...] = ()) -> dict[str, dict]:
    """Metrics of the scored rows of several runs (run, user_id, label, pred[, in_<g>...]), every run
    in the same passes: run -> {metrics, "rows", "users" (distinct)}; for each group g also over the
    rows with in_<g> true (``<metric>_in_<g>``) and false (``_out_<g>``). rating -> RMSE, MAE from
    per-batch error sums (one pass), the users from sums per (run, user_id) (``data.sum_by``); ctr -> exact AUC
    over one distributed sort by (run, pred), uAUC = mean per-user AUC (users with both classes) and
    the users from one groupby. Nothing per row is collected; a run without rows is absent, a
    selection without rows gets no metrics. ``ds`` is read more than once: materialize it first."""
    flags = [f"in_{g}" for g in groups]
    if task == "rating":
        sums = _by_run(
            ds.select_columns(["run", "label", "pred", *flags]).map_batches(
                _error_sums, fn_kwargs={"groups": groups}, batch_format="pyarrow"
            )
        )
        users = _by_run(sum_by(ds, ["run", "user_id"]).map_batches(_users_by_run, batch_format="pyarrow"))
        out = {}
        for run, s in sums.iterrows():
            m = out.setdefault(run, {"rows": int(s["n"]), "users": int(users.loc[run, "users"])})
            for side in _sides(groups):
                if s[f"n{side}"] > 0:
                    errors = error_metrics(s[f"se{side}"], s[f"ae{side}"], s[f"n{side}"])
                    m.update({f"{k}{side}": v for k, v in errors.items()})
        return out
    aucs: dict[tuple[str, str], SortedAUC] = {}
    by_pred = ds.select_columns(["run", "label", "pred", *flags]).sort(["run", "pred"])
    for b in by_pred.iter_batches(batch_format="numpy", batch_size=65_536):
        masks = _masks(b, groups)
        for run in np.unique(b["run"]):  # a run's rows are contiguous, in ascending pred order
            this = b["run"] == run
            for side, m in masks.items():
                keep = this if m is None else this & m
                aucs.setdefault((str(run), side), SortedAUC()).add(b["pred"][keep], b["label"][keep])
    per_user = (
        ds.select_columns(["run", "user_id", "label", "pred", *flags])
        .groupby(["run", "user_id"], num_partitions=shuffle_partitions(ds.count()))
        .map_groups(_user_auc, fn_kwargs={"groups": groups}, batch_format="pandas")
    )
    sums = _by_run(per_user.map_batches(_uauc_sums, fn_kwargs={"groups": groups}, batch_format="pyarrow"))
    out = {}
    for (run, side), auc in aucs.items():
        s = sums.loc[run]
        m = out.setdefault(run, {"uauc_users": int(s["users"]), "users": int(s["seen"])})
        if side == "":
            m["rows"] = auc.rows()
        if auc.rows():
            n = int(s[f"users{side}"])
            m.update({f"auc{side}": auc.value(), f"uauc{side}": s[f"auc_sum{side}"] / n if n else float("nan")})
    return out


def tag_run(batch: pa.Table, run: str) -> pa.Table:
    """Prompt-store rows -> (user_id, run, prompt as list<float32>): one schema for stores of any width."""
    return pa.table(
        {
            "user_id": batch.column("user_id"),
            "run": pa.repeat(pa.scalar(run, pa.string()), batch.num_rows),
            "prompt": batch.column("prompt").cast(pa.list_(pa.float32())),
        }
    )


def as_run(batch: pa.Table, run: str | None = None) -> pa.Table:
    """Scored rows of a method -> (run, user_id, label, pred float64), one schema for every method's
    rows so that they are measured together; ``run``: the method's name (None: the rows' run column)."""
    name = batch.column("run") if run is None else pa.repeat(pa.scalar(run, pa.string()), batch.num_rows)
    cols = {"run": name, "user_id": batch.column("user_id"), "label": batch.column("label")}
    return with_held(batch, {**cols, "pred": batch.column("pred").cast(pa.float64())})


def with_subsets(ds, subsets: dict[str, pa.Array]):
    """Adds a boolean column ``in_<name>`` per subset (small user lists, e.g. the adapter's users)."""
    if not subsets:
        return ds

    def flag(batch: pa.Table) -> pa.Table:
        for name, users in subsets.items():
            batch = batch.append_column(
                f"in_{name}", pc.is_in(batch.column("user_id").cast(pa.string()), value_set=users)
            )
        return batch

    return ds.map_batches(flag, batch_format="pyarrow")


def report_metrics(task: str, scored, subsets: dict[str, pa.Array]) -> dict[str, dict]:
    """Per run of ``scored`` (:func:`as_run`'s rows): whole-set metrics plus, per subset, the same
    metrics inside and outside it, "rows" and "users"; every run in one set of passes."""
    return run_metrics(task, compact(with_subsets(scored, subsets).materialize()), tuple(subsets))
