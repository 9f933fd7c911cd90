"""Metrics of scored rows (label, pred[, user_id][, in_<subset>...]) as Ray Datasets, streamed.

rating -> RMSE, MAE from per-batch error sums; ctr -> exact AUC over one distributed sort, uAUC =
mean per-user AUC over users with both classes (scikit-learn per user, one groupby). For each
subset g the same metrics inside (``<metric>_in_<g>``) and outside (``_out_<g>``) it, in the same
passes. Nothing per row is collected. A light module on purpose: its functions run in Ray tasks,
which import it (no torch, no transformers).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from sklearn.metrics import roc_auc_score

from puma_ray.data import shuffle_partitions
from puma_ray.errors import PumaError


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
    """One row per batch: n, se, ae for every row selection of :func:`_masks` (column suffixes)."""
    err = np.asarray(batch.column("pred"), np.float64) - np.asarray(batch.column("label"), np.float64)
    cols = {}
    for side, m in _masks(batch, groups).items():
        e = err if m is None else err[m]
        cols.update({f"n{side}": [len(e)], f"se{side}": [float((e**2).sum())], f"ae{side}": [float(np.abs(e).sum())]})
    return pa.table(cols)


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


def sorted_auc(batches) -> float:
    """Exact ROC AUC of batches ({"pred", "label"}) sorted by pred ascending (see SortedAUC)."""
    auc = SortedAUC()
    for b in batches:
        auc.add(b["pred"], b["label"])
    return auc.value()


def _user_auc(group: pd.DataFrame, groups=()) -> pd.DataFrame:
    """One user's rows -> (auc_sum, users[, in_<g>]): their AUC and 1, or 0 and 0 when they have one
    class only; the user's subset flags are carried along."""

    y = group["label"].to_numpy() > 0.5
    both = 0 < y.sum() < len(y)
    return pd.DataFrame(
        {
            "auc_sum": [float(roc_auc_score(y, group["pred"].to_numpy())) if both else 0.0],
            "users": [int(both)],
            **{f"in_{g}": [bool(group[f"in_{g}"].iloc[0])] for g in groups},
        }
    )


def _uauc_sums(batch: pd.DataFrame, groups=()) -> pd.DataFrame:
    cols = {}
    for side, m in _masks(batch, groups).items():
        part = batch if m is None else batch[m]
        cols.update({f"auc_sum{side}": [float(part["auc_sum"].sum())], f"users{side}": [int(part["users"].sum())]})
    return pd.DataFrame(cols)


def dataset_metrics(task: str, ds, groups: tuple[str, ...] = ()) -> dict:
    """Metrics of a scored Ray Dataset (label, pred[, user_id][, in_<g>...]), streamed; for each
    group g also over the rows with in_<g> true (``<metric>_in_<g>``) and false (``_out_<g>``), in
    the same passes. rating -> RMSE, MAE from per-batch error sums; ctr -> exact AUC over one
    distributed sort, uAUC = mean per-user AUC (users with both classes) from one groupby.
    Nothing per row is collected; a selection without rows gets no metrics."""
    flags = [f"in_{g}" for g in groups]
    if task == "rating":
        sums = (
            ds.select_columns(["label", "pred", *flags])
            .map_batches(_error_sums, fn_kwargs={"groups": groups}, batch_format="pyarrow")
            .to_pandas()
            .sum()
        )
        if sums.get("n", 0) == 0:
            raise PumaError("no valid row could be scored (no user of the valid set has a prompt)")
        return {
            f"{k}{side}": v
            for side in _sides(groups)
            if sums[f"n{side}"] > 0
            for k, v in (
                ("rmse", math.sqrt(sums[f"se{side}"] / sums[f"n{side}"])),
                ("mae", float(sums[f"ae{side}"] / sums[f"n{side}"])),
            )
        }
    aucs: dict[str, SortedAUC] = {}
    for b in (
        ds.select_columns(["label", "pred", *flags]).sort("pred").iter_batches(batch_format="numpy", batch_size=65_536)
    ):
        for side, m in _masks(b, groups).items():
            aucs.setdefault(side, SortedAUC()).add(
                b["pred"] if m is None else b["pred"][m], b["label"] if m is None else b["label"][m]
            )
    rows = aucs[""].rows() if "" in aucs else 0
    per_user = (
        ds.select_columns(["user_id", "label", "pred", *flags])
        .groupby("user_id", num_partitions=shuffle_partitions(rows))
        .map_groups(_user_auc, fn_kwargs={"groups": groups}, batch_format="pandas")
    )
    sums = per_user.map_batches(_uauc_sums, fn_kwargs={"groups": groups}, batch_format="pandas").to_pandas().sum()
    out = {"uauc_users": int(sums.get("users", 0))}
    for side, auc in aucs.items():
        if auc.rows():
            n = int(sums.get(f"users{side}", 0))
            out.update({f"auc{side}": auc.value(), f"uauc{side}": sums[f"auc_sum{side}"] / n if n else float("nan")})
    if "auc" not in out:
        out.update(auc=float("nan"), uauc=float("nan"))
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


def only_run(batch: pa.Table, run: str) -> pa.Table:
    """Scored rows of every run -> the rows of ``run``, without the run column."""
    return batch.filter(pc.equal(batch.column("run"), run)).drop_columns(["run"])


def distinct_users(ds, rows: int) -> int:
    """Distinct user_id values of ``ds`` (``rows`` rows), by a groupby."""
    return ds.select_columns(["user_id"]).groupby("user_id", num_partitions=shuffle_partitions(rows)).count().count()


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


def report_metrics(task: str, scored, subsets: dict[str, pa.Array]) -> dict:
    """Whole-set metrics plus, per subset, the same metrics inside and outside it (one set of passes)."""
    return dataset_metrics(task, with_subsets(scored, subsets).materialize(), tuple(subsets))
