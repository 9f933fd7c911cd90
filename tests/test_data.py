import pyarrow as pa
import pytest
import ray

from puma_ray import data


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
