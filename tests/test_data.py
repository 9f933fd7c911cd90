import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import ray

from puma_ray import data
from puma_ray.data import mark_held


def _rows():
    users = [f"u{i % 7}" for i in range(40)]
    return pa.table({"user_id": users, "label": [float(i) for i in range(40)]})


def _side():
    # u0 twice (a key repeated on the side), u5 and u6 absent, a list column (pyarrow joins take none)
    return pa.table(
        {
            "user_id": ["u0", "u0", "u1", "u2", "u3", "u4", "u9"],
            "prompt": [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0], [9.0, 0.5], [1.5, 2.5], [0.0, 0.0]],
        }
    )


def _sorted(table: pa.Table) -> list[tuple]:
    return sorted(
        zip(table.column("user_id").to_pylist(), table.column("label").to_pylist(), table.column("prompt").to_pylist()),
        key=lambda r: (r[0], r[1], r[2] or []),
    )


@pytest.mark.parametrize("how", ["inner", "left_outer"])
def test_broadcast_join_equals_hash_join(how, ray_session):
    rows = ray.data.from_arrow(_rows()).repartition(3)
    got = {}
    for path, limit in (("broadcast", 1 << 30), ("hash", 0)):
        joined = data.join_on(rows, ray.data.from_arrow(_side()), "user_id", 40, 100, how=how, broadcast_bytes=limit)
        got[path] = _sorted(pa.concat_tables(ray.get(joined.to_arrow_refs())))
    assert got["broadcast"] == got["hash"]
    # u0..u4 have 6 rows each (u0 matched twice), u5 and u6 5 each: left_outer keeps those 10 with no prompt
    want_inner = 6 * 2 + 6 + 6 + 6 + 6
    missing = [r for r in got["broadcast"] if r[2] is None]
    assert len(got["broadcast"]) == want_inner + (len(missing) if how == "left_outer" else 0)
    assert {r[0] for r in missing} == ({"u5", "u6"} if how == "left_outer" else set())
    assert len(missing) == (10 if how == "left_outer" else 0)


@pytest.mark.parametrize("merge", ["one task", "hash groupby"])
def test_sum_by_equals_pandas(merge, ray_session, monkeypatch):
    """Sums and row counts per key (one key and two) over 9 blocks, each key spread over several of
    them: merged in one task, or by a Ray Data groupby (partitions of 100 partial rows: 3-5); distinct
    keys, a shrunk mean per key and a column's mean from the same sums; and ``compact`` cuts the
    blocks without changing the rows."""
    if merge == "hash groupby":
        monkeypatch.setattr(data, "ROWS_PER_PARTITION", 100)
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {
            "run": rng.choice(["a", "b"], 300),
            "user_id": [f"u{i}" for i in rng.integers(0, 23, 300)],
            "x": rng.normal(size=300),
            "y": rng.integers(0, 5, 300),
        }
    )
    ds = ray.data.from_pandas(frame).repartition(9).materialize()
    for keys in (["user_id"], ["run", "user_id"]):
        got = data.sum_by(ds, keys, ["x", "y"]).to_pandas().set_index(keys).sort_index()
        want = frame.groupby(keys).agg(x=("x", "sum"), y=("y", "sum"), n=("x", "size")).sort_index()
        assert list(got.index) == list(want.index)
        np.testing.assert_allclose(got["x"], want["x"], rtol=1e-12)
        np.testing.assert_array_equal(got["y"], want["y"])
        np.testing.assert_array_equal(got["n"], want["n"])
        assert data.distinct(ds, keys) == len(want)
    shrunk = data.mean_by(ds, ["run", "user_id"], "x", reg=2.0, name="m").to_pandas().set_index(["run", "user_id"])
    by = frame.groupby(["run", "user_id"])["x"]
    np.testing.assert_allclose(shrunk["m"].sort_index(), (by.sum() / (by.size() + 2.0)).sort_index(), rtol=1e-12)
    assert data.column_mean(ds, "x") == pytest.approx(frame["x"].mean(), rel=1e-12)
    compacted = data.compact(ds)
    assert compacted.num_blocks() == 1 and sorted(compacted.to_pandas()["x"]) == sorted(frame["x"])


def test_mark_held_is_a_stable_hash_of_user_and_item():
    rows = pa.table({"user_id": [f"u{i % 50}" for i in range(4000)], "item_id": [f"i{i}" for i in range(4000)]})
    held = mark_held(rows, 0.3).column("held").to_numpy()
    assert abs(held.mean() - 0.3) < 0.03  # the share asked for
    np.testing.assert_array_equal(held, mark_held(rows.slice(0, 4000), 0.3).column("held").to_numpy())
    reordered = mark_held(rows.take(list(range(3999, -1, -1))), 0.3).column("held").to_numpy()
    np.testing.assert_array_equal(held, reordered[::-1])  # a row's own key decides, not its place
    users = pa.table({"user_id": rows.column("user_id"), "item_id": pa.array(["same"] * 4000)})
    by_user = mark_held(users, 0.3).column("held").to_numpy()
    assert 0 < by_user.mean() < 1 and not np.array_equal(by_user, held)  # the item is part of the key
