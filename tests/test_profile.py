import numpy as np
import pyarrow as pa
import pytest

from puma_ray import data, storage
from puma_ray.errors import PumaError
from puma_ray.profile import profile_users, read_profile


def test_profile_matches_pandas_groupby(tmp_path, rating_data, ray_session):
    out = str(tmp_path / "profile")
    res = profile_users(f"{rating_data}/train", "rating", out)

    train = storage.read_table(f"{rating_data}/train").to_pandas()
    want = train.groupby("user_id")["label"].agg(
        n="count", label_mean="mean", label_var=lambda s: s.astype(np.float64).var(ddof=0)
    )
    assert res == {"users": len(want), "rows": len(train), "uri": out}

    schema = storage.read_table(out).schema
    assert [(f.name, f.type) for f in schema] == [
        ("user_id", pa.string()),
        ("n", pa.int64()),
        ("label_mean", pa.float64()),
        ("label_var", pa.float64()),
    ]

    got = read_profile(out).set_index("user_id")
    assert list(got.index) == sorted(want.index)
    np.testing.assert_array_equal(got["n"].to_numpy(), want.loc[got.index, "n"].to_numpy())
    np.testing.assert_allclose(got["label_mean"].to_numpy(), want.loc[got.index, "label_mean"].to_numpy(), rtol=1e-9)
    np.testing.assert_allclose(
        got["label_var"].to_numpy(), want.loc[got.index, "label_var"].to_numpy(), rtol=1e-7, atol=1e-9
    )
    assert (got["label_var"] > 0).any()

    # Running again replaces the previous profile instead of adding to it.
    profile_users(f"{rating_data}/train", "rating", out)
    assert len(read_profile(out)) == len(want)


def test_profile_refuses_a_foreign_output_dir(tmp_path, rating_data):
    out = str(tmp_path / "busy")
    storage.write_bytes(f"{out}/notes.txt", b"keep me")
    with pytest.raises(PumaError, match="not a user profile"):
        profile_users(f"{rating_data}/train", "rating", out)
    assert storage.read_bytes(f"{out}/notes.txt") == b"keep me"


def test_read_profile_rejects_other_tables(tmp_path):
    storage.write_table(str(tmp_path / "x.parquet"), pa.table({"user_id": ["a"]}))
    with pytest.raises(PumaError, match="not a user profile"):
        read_profile(str(tmp_path / "x.parquet"))


@pytest.mark.parametrize("merge", ["one task", "hash groupby"])
def test_profile_merges_users_spread_over_many_blocks(merge, tmp_path, rating_data, ray_session, monkeypatch):
    """Rows shuffled over 17 files: every user's partial sums come from several blocks and are merged,
    in one task (partials that fit a hash partition) or by a Ray Data groupby (partitions of 400 rows: 2-3 of them)."""
    if merge == "hash groupby":
        monkeypatch.setattr(data, "ROWS_PER_PARTITION", 400)
    train = storage.read_table(f"{rating_data}/train")
    rows = train.take(np.random.default_rng(0).permutation(train.num_rows))
    for i, start in enumerate(range(0, rows.num_rows, -(-rows.num_rows // 17))):
        storage.write_table(
            str(tmp_path / "many" / f"part-{i:02d}.parquet"), rows.slice(start, -(-rows.num_rows // 17))
        )
    profile_users(str(tmp_path / "many"), "rating", str(tmp_path / "p"))
    got = read_profile(str(tmp_path / "p")).set_index("user_id")
    want = (
        train.to_pandas()
        .groupby("user_id")["label"]
        .agg(n="count", mean="mean", var=lambda s: s.astype(np.float64).var(ddof=0))
    )
    assert list(got.index) == sorted(want.index)
    np.testing.assert_array_equal(got["n"].to_numpy(), want.loc[got.index, "n"].to_numpy())
    np.testing.assert_allclose(got["label_mean"].to_numpy(), want.loc[got.index, "mean"].to_numpy(), rtol=1e-9)
    np.testing.assert_allclose(got["label_var"].to_numpy(), want.loc[got.index, "var"].to_numpy(), rtol=1e-7, atol=1e-9)
