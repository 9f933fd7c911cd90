"""Baselines that need no LM, scored beside every method: valid rows -> (user_id, label, pred).

- ``global_mean``: the mean train label mu.
- ``user_mean``: the user's mean train label (mu for a user without train rows).
- ``bias``: mu + b_u + b_i, regularised user and item offsets fit by alternating least squares on
  the train rows (Koren's baseline predictor): each sweep sets
  b_i = sum over the item's rows of (r - mu - b_u) / (reg_item + n_i), then
  b_u = sum over the user's rows of (r - mu - b_i) / (reg_user + n_u); an unseen user or item gets
  offset 0; predictions are clipped to the task's label range. On real ratings it is the bar any
  personalization must clear.

Streamed with Ray Data (means per user_id / item_id by ``data.mean_by``, joins on them); only the
per-user and per-item tables (means, offsets) are materialized, and joined by broadcast while they
are small. A light module: its functions run in Ray tasks.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from puma_ray.data import HELD, join_on, mean_by, with_held
from puma_ray.schema import LABEL_RANGE


def _predictions(batch: pa.Table, pred: pa.Array) -> pa.Table:
    return with_held(batch, {"user_id": batch.column("user_id"), "label": batch.column("label"), "pred": pred})


def _valid(valid, cfg, *columns: str):
    """``valid``'s ``columns``, and its :data:`HELD` column when the evaluation ``cfg`` holds rows out."""
    return valid.select_columns([*columns, *([HELD] if cfg.holdout else [])])


def _constant(batch: pa.Table, value: float) -> pa.Table:
    return _predictions(batch, pa.array(np.full(batch.num_rows, value)))


def global_mean(train, train_rows: int, valid, valid_rows: int, mu: float, task: str, cfg) -> object:
    """Every valid row predicted by ``mu``, the mean train label."""
    return _valid(valid, cfg, "user_id", "label").map_batches(
        _constant, fn_kwargs={"value": mu}, batch_format="pyarrow"
    )


def _user_mean_pred(batch: pa.Table, mu: float) -> pa.Table:
    return _predictions(batch, pc.fill_null(batch.column("user_mean").cast(pa.float64()), mu))


def user_mean(train, train_rows: int, valid, valid_rows: int, mu: float, task: str, cfg) -> object:
    """Each valid row predicted by its user's mean train label (``mu`` for users without train rows)."""
    means = mean_by(train, ["user_id"], "label", name="user_mean").materialize()  # one row per user
    joined = _with_offset(_valid(valid, cfg, "user_id", "label"), means, valid_rows, "user_id")
    return joined.map_batches(_user_mean_pred, fn_kwargs={"mu": mu}, batch_format="pyarrow")


def _residual(batch: pa.Table, mu: float, offset: str, key: str) -> pa.Table:
    """label - mu - (the joined offset, 0 where absent) -> (key, r): the residuals to average per ``key``."""
    r = pc.subtract(batch.column("label").cast(pa.float64()), mu)
    if offset in batch.column_names:
        r = pc.subtract(r, pc.fill_null(batch.column(offset), 0.0))
    return pa.table({key: batch.column(key), "r": r})


def _offsets(rows, mu: float, offset: str, key: str, name: str, reg: float):
    """Regularised mean residual (label - mu - ``offset``) per ``key`` -> a materialized (key, name) table."""
    resid = rows.map_batches(_residual, fn_kwargs={"mu": mu, "offset": offset, "key": key}, batch_format="pyarrow")
    return mean_by(resid, [key], "r", reg, name).materialize()


def _with_offset(ds, table, n: int, key: str):
    """``ds`` (``n`` rows) with the columns of ``table`` (materialized, one row per ``key``), nulls where absent."""
    return join_on(ds, table, key, n, side_bytes=table.size_bytes(), how="left_outer")


def _bias_pred(batch: pa.Table, mu: float, lo: float, hi: float) -> pa.Table:
    pred = pc.add(pc.add(pc.fill_null(batch.column("b_u"), 0.0), pc.fill_null(batch.column("b_i"), 0.0)), mu)
    return _predictions(batch, pc.min_element_wise(pc.max_element_wise(pred, lo), hi))


def bias(train, train_rows: int, valid, valid_rows: int, mu: float, task: str, cfg) -> object:
    """mu + b_u + b_i fit by ``cfg.bias_sweeps`` ALS sweeps (module docstring), clipped to the label range."""
    rows = train.select_columns(["user_id", "item_id", "label"])
    users = None
    for _ in range(cfg.bias_sweeps):
        by_user = rows if users is None else _with_offset(rows, users, train_rows, "user_id")
        items = _offsets(by_user, mu, "b_u", "item_id", "b_i", cfg.bias_reg_item)
        by_item = _with_offset(rows, items, train_rows, "item_id")
        users = _offsets(by_item, mu, "b_i", "user_id", "b_u", cfg.bias_reg_user)
    lo, hi = LABEL_RANGE[task]
    scored = _with_offset(_valid(valid, cfg, "user_id", "item_id", "label"), users, valid_rows, "user_id")
    scored = _with_offset(scored, items, valid_rows, "item_id")
    return scored.map_batches(_bias_pred, fn_kwargs={"mu": mu, "lo": lo, "hi": hi}, batch_format="pyarrow")


BASELINES = {"global_mean": global_mean, "user_mean": user_mean, "bias": bias}  # name -> scored valid rows
