import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from puma_ray import storage
from puma_ray.errors import PumaError
from puma_ray.schema import StoreMeta, prompt_table


@pytest.mark.parametrize("prefix", ["plain", "file"])
def test_local_roundtrip(tmp_path, prefix):
    base = str(tmp_path) if prefix == "plain" else f"file://{tmp_path}"
    storage.write_json(storage.join(base, "a/b.json"), {"x": 1})
    assert storage.read_json(storage.join(base, "a/b.json")) == {"x": 1}
    t = pa.table({"u": ["a", "b"], "v": [1.0, 2.0]})
    storage.write_table(storage.join(base, "t/part-0.parquet"), t)
    assert storage.read_table(storage.join(base, "t")).equals(t)
    assert storage.read_schema(storage.join(base, "t")).names == ["u", "v"]
    assert storage.list_files(storage.join(base, "t"), ".parquet") == [storage.join(base, "t/part-0.parquet")]
    assert storage.exists(storage.join(base, "a/b.json")) and not storage.exists(storage.join(base, "nope"))


def test_resolve_kinds(tmp_path):
    fs, path = storage.resolve("s3://bucket/some/prefix/")
    assert isinstance(fs, pafs.S3FileSystem) and path == "bucket/some/prefix"
    fs, path = storage.resolve(str(tmp_path / "x"))
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "x")
    with pytest.raises(PumaError, match="unsupported URI scheme 'gs'"):
        storage.resolve("gs://bucket/x")
    with pytest.raises(PumaError, match="needs a bucket"):
        storage.resolve("s3:///x")


def test_missing_and_empty(tmp_path):
    with pytest.raises(PumaError, match="not found"):
        storage.read_bytes(str(tmp_path / "missing.json"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PumaError, match="empty input"):
        storage.read_schema(str(tmp_path / "empty"))


def test_s3_roundtrip_over_http(s3_bucket):
    """The same functions against a real HTTP S3 endpoint (moto server), endpoint from AWS_ENDPOINT_URL."""
    uri = f"{s3_bucket}/stage/x"
    storage.write_json(storage.join(uri, "m.json"), {"ok": True})
    assert storage.read_json(storage.join(uri, "m.json")) == {"ok": True}
    t = pa.table({"user_id": ["u1"], "label": pa.array([4.0], pa.float32())})
    storage.write_table(storage.join(uri, "d/part-0.parquet"), t)
    assert storage.read_table(storage.join(uri, "d")).equals(t)
    assert storage.list_files(storage.join(uri, "d")) == [storage.join(uri, "d/part-0.parquet")]


def test_s3_errors_name_uri_not_secret(s3_server):
    with pytest.raises(PumaError) as e:
        storage.read_bytes("s3://no-such-bucket-xyz/a.json")
    assert "s3://no-such-bucket-xyz/a.json" in str(e.value)
    assert "testing-secret-do-not-print" not in str(e.value)


def test_prompt_vectors_are_written_byte_stream_split(tmp_path):
    """A prompt store's float vectors go BYTE_STREAM_SPLIT + zstd (fast to encode and decode, smaller),
    user ids dictionary-encoded; the values read back bit for bit."""
    meta = StoreMeta(model="m", model_fingerprint="f", hidden_size=6, prompt_length=2, template="rating_v1", stage="x")
    prompts = np.random.default_rng(0).normal(size=(50, 12)).astype(np.float32)
    table = prompt_table(meta, [f"u{i}" for i in range(50)], prompts)
    uri = str(tmp_path / "part-0.parquet")
    storage.write_table(uri, table)
    columns = pq.ParquetFile(uri).metadata.row_group(0)
    enc = {columns.column(i).path_in_schema: columns.column(i).encodings for i in range(columns.num_columns)}
    assert "BYTE_STREAM_SPLIT" in enc["prompt.list.element"]
    assert "RLE_DICTIONARY" in enc["user_id"] and "BYTE_STREAM_SPLIT" not in enc["user_id"]
    assert storage.read_table(uri).equals(table)
