import numpy as np
import pyarrow as pa
import pytest

from puma_ray import schema, storage
from puma_ray.errors import PumaError

META = schema.StoreMeta(
    model="m", model_fingerprint="abc", hidden_size=4, prompt_length=2, template="rating_v1", stage="prompts"
)


def test_store_roundtrip(tmp_path):
    p = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    schema.write_prompt_store(str(tmp_path / "s"), META, ["a", "b", "c"], p)
    meta, ids, got = schema.read_prompt_store(str(tmp_path / "s"), expect_fingerprint="abc")
    assert meta == META and ids == ["a", "b", "c"] and np.array_equal(got, p)
    t = storage.read_table(str(tmp_path / "s"))
    assert t.schema.field("prompt").type == pa.list_(pa.float32(), 8)


def test_store_refuses_other_model(tmp_path):
    schema.write_prompt_store(str(tmp_path / "s"), META, ["a"], np.zeros((1, 8), np.float32))
    with pytest.raises(PumaError, match="made for model 'm'.*fingerprint abc"):
        schema.read_prompt_store(str(tmp_path / "s"), expect_fingerprint="zzz")


def _raw_store(tmp_path, ids, prompts, width):
    arr = pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(prompts, np.float32).reshape(-1)), width)
    t = pa.Table.from_arrays([pa.array(ids, pa.string()), arr], names=["user_id", "prompt"]).replace_schema_metadata(
        META.to_metadata()
    )
    storage.write_table(str(tmp_path / "s/part-0.parquet"), t)
    return str(tmp_path / "s")


def test_store_wrong_width(tmp_path):
    uri = _raw_store(tmp_path, ["a"], np.zeros((1, 6)), 6)
    with pytest.raises(PumaError, match=r"fixed_size_list<float32>\[8\].*l=2 x d=4"):
        schema.read_prompt_store(uri)


def test_store_nan_inf(tmp_path):
    p = np.zeros((3, 8))
    p[1, 2] = np.nan
    p[2, 0] = np.inf
    uri = _raw_store(tmp_path, ["a", "b", "c"], p, 8)
    with pytest.raises(PumaError, match=r"2 prompt\(s\) contain NaN or Inf, e.g. users \['b', 'c'\]"):
        schema.read_prompt_store(uri)


def test_store_duplicate_ids(tmp_path):
    uri = _raw_store(tmp_path, ["a", "b", "a"], np.zeros((3, 8)), 8)
    with pytest.raises(PumaError, match=r"1 duplicate user_id row\(s\), e.g. \['a'\]"):
        schema.read_prompt_store(uri)


def test_store_empty(tmp_path):
    uri = _raw_store(tmp_path, [], np.zeros((0, 8)), 8)
    with pytest.raises(PumaError, match="empty prompt store"):
        schema.read_prompt_store(uri)


def test_not_a_store(tmp_path):
    storage.write_table(str(tmp_path / "x/p.parquet"), pa.table({"user_id": ["a"]}))
    with pytest.raises(PumaError, match="not a puma-ray prompt store"):
        schema.read_prompt_store(str(tmp_path / "x"))


def _interactions(**over):
    cols = {
        "user_id": ["u1", "u2"],
        "item_id": ["i1", "i2"],
        "label": pa.array([1.0, 5.0], pa.float32()),
        "item_text": ["a b", "c"],
    }
    cols.update(over)
    return pa.table(cols)


def test_interactions_schema_checks():
    schema.check_interactions_schema("x", _interactions().schema)
    with pytest.raises(PumaError, match="x: interactions lack required column 'item_text'"):
        schema.check_interactions_schema("x", _interactions().drop_columns(["item_text"]).schema)
    with pytest.raises(PumaError, match="column 'label' has type string"):
        schema.check_interactions_schema("x", _interactions(label=["1", "2"]).schema)
    bad_hist = _interactions(history_text=[1, 2])
    with pytest.raises(PumaError, match="column 'history_text'"):
        schema.check_interactions_schema("x", bad_hist.schema)


def test_label_ranges():
    schema.check_interaction_values("x", "rating", _interactions())
    with pytest.raises(PumaError, match=r"x: 1 label\(s\) outside the rating range 1..5, e.g. \[6.0\]"):
        schema.check_interaction_values("x", "rating", _interactions(label=pa.array([1.0, 6.0], pa.float32())))
    with pytest.raises(PumaError, match="outside the ctr range 0 or 1"):
        schema.check_interaction_values("x", "ctr", _interactions(label=pa.array([0.0, 0.5], pa.float32())))
    with pytest.raises(PumaError, match="outside the rating range"):
        schema.check_interaction_values("x", "rating", _interactions(label=pa.array([1.0, float("nan")], pa.float32())))
    with pytest.raises(PumaError, match="column 'user_id' has 1 null"):
        schema.check_interaction_values("x", "rating", _interactions(user_id=pa.array(["u1", None])))


def test_normalize_casts_compatible_types():
    t = _interactions(label=pa.array([1, 5], pa.int64()), user_id=pa.array(["a", "b"], pa.large_string()))
    n = schema.normalize_interactions(t)
    assert n.schema.field("label").type == pa.float32() and n.schema.field("user_id").type == pa.string()
