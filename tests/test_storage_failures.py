"""Object-store failures end with ONE error line naming the URI, never a credential (issue 4, item 7).

Against a real HTTP S3 endpoint (moto server mode, tests/conftest.py): a missing bucket, refused
credentials, an unreachable / dead endpoint, and a truncated Parquet file; through the storage
functions, the Ray Data read path and, where cheap, the CLI (`main([...])` -> exit 2).
"""

from __future__ import annotations

import socket
import time
import urllib.request
import uuid

import numpy as np
import pyarrow as pa
import pytest

from puma_ray import storage
from puma_ray.cli import main
from puma_ray.data import load_interactions
from puma_ray.errors import PumaError
from puma_ray.schema import StoreMeta, read_prompt_store, write_prompt_store

SECRET = "testing-secret-do-not-print"  # the fixture's AWS_SECRET_ACCESS_KEY


def _one_line(exc_info, uri: str, *words: str) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    assert msg.startswith(uri), msg
    assert SECRET not in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


def _cli_error(capsys, argv: list[str], uri: str, *words: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {uri}"), err
    assert SECRET not in err and "Traceback" not in err
    for w in words:
        assert w in err, err
    return err


@pytest.fixture
def missing_bucket(s3_server) -> str:
    return f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}"


def test_missing_bucket(missing_bucket, capsys):
    b = missing_bucket
    for fn, uri in (
        (storage.read_bytes, f"{b}/a.json"),
        (storage.read_table, f"{b}/t"),
        (storage.read_schema, f"{b}/t"),
    ):
        with pytest.raises(PumaError) as e:
            fn(uri)
        _one_line(e, uri, "does not exist", b[5:])
    with pytest.raises(PumaError) as e:
        storage.write_json(f"{b}/m.json", {"x": 1})
    _one_line(e, f"{b}/m.json", "does not exist")
    _cli_error(
        capsys,
        ["data", "synth", "--out", f"{b}/synth", "--users", "5", "--items", "100"],
        f"{b}/synth",
        "does not exist",
    )


def test_missing_bucket_ray_read(missing_bucket, ray_session):
    with pytest.raises(PumaError) as e:
        storage.ray_read_parquet(f"{missing_bucket}/store")
    _one_line(e, f"{missing_bucket}/store", "does not exist")


@pytest.fixture
def iam_enforced(s3_server):
    """moto checks credentials while this is active: the fixture's dummy key is then unknown."""

    def auth(value: str) -> None:
        req = urllib.request.Request(
            f"{s3_server}/moto-api/reset-auth",
            data=value.encode(),
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        urllib.request.urlopen(req, timeout=10).read()

    auth("0")
    try:
        yield
    finally:
        auth("inf")


def test_wrong_credentials(s3_bucket, iam_enforced, capsys):
    uri = f"{s3_bucket}/x"
    for fn in (storage.read_bytes, storage.read_table, storage.list_files, storage.exists):
        with pytest.raises(PumaError) as e:
            fn(uri)
        _one_line(e, uri, "access denied", "credentials")
    with pytest.raises(PumaError) as e:
        storage.write_table(f"{uri}/part-0.parquet", pa.table({"a": [1]}))
    _one_line(e, f"{uri}/part-0.parquet", "access denied")
    _cli_error(capsys, ["data", "synth", "--out", uri, "--users", "5", "--items", "100"], uri, "access denied")


def _refused_endpoint() -> str:
    with socket.socket() as s:  # a port nobody listens on (closed again at once)
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_unreachable_endpoint(s3_server, monkeypatch, capsys):
    endpoint = _refused_endpoint()
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    uri = "s3://some-bucket/x"
    t0 = time.time()
    with pytest.raises(PumaError) as e:
        storage.read_bytes(f"{uri}/a.json")
    _one_line(e, f"{uri}/a.json", "cannot reach the S3 endpoint", endpoint)
    with pytest.raises(PumaError) as e:
        storage.list_files(uri)
    _one_line(e, uri, "cannot reach")
    _cli_error(capsys, ["data", "synth", "--out", uri, "--users", "5"], uri, "cannot reach", endpoint)
    assert time.time() - t0 < 30  # retries are bounded (S3_MAX_ATTEMPTS, connect timeout)


def test_dead_endpoint_fails_in_seconds(s3_server, monkeypatch):
    """An endpoint that never completes a connection (SYN dropped: a full accept backlog) fails
    after the connect timeout x attempts, not after minutes."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    port = srv.getsockname()[1]
    fillers = []
    for _ in range(4):  # fill the backlog; later SYNs are dropped
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(("127.0.0.1", port))
        fillers.append(c)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    try:
        t0 = time.time()
        with pytest.raises(PumaError) as e:
            storage.read_bytes("s3://some-bucket/a.json")
        wall = time.time() - t0
    finally:
        for c in fillers:
            c.close()
        srv.close()
    _one_line(e, "s3://some-bucket/a.json", "cannot reach")
    budget = storage.S3_MAX_ATTEMPTS * (storage.S3_CONNECT_TIMEOUT_S + storage.S3_REQUEST_TIMEOUT_S) + 10
    assert wall < budget, wall


def _truncate(uri: str) -> None:
    data = storage.read_bytes(uri)
    storage.write_bytes(uri, data[: len(data) // 2])


def test_truncated_parquet(s3_bucket):
    meta = StoreMeta(model="m", model_fingerprint="f", hidden_size=4, prompt_length=1, template="t", stage="prompts")
    store = f"{s3_bucket}/store"
    write_prompt_store(store, meta, ["u1", "u2"], np.zeros((2, 4), np.float32))
    _truncate(f"{store}/part-00000.parquet")
    for fn in (storage.read_table, storage.read_schema, read_prompt_store):
        with pytest.raises(PumaError) as e:
            fn(store)
        _one_line(e, store, "truncated or corrupt Parquet file", "part-00000.parquet")


def test_truncated_parquet_ray_read(s3_bucket, ray_session, rating_data):
    """The footer check reads one file; a later truncated file is caught where Ray Data opens it."""

    uri = f"{s3_bucket}/train"
    table = storage.read_table(f"{rating_data}/train")
    storage.write_table(f"{uri}/part-00000.parquet", table.slice(0, 100))
    storage.write_table(f"{uri}/part-00001.parquet", table.slice(100))
    _truncate(f"{uri}/part-00001.parquet")
    with pytest.raises(PumaError) as e:
        load_interactions(uri, "rating")
    _one_line(e, uri, "truncated or corrupt Parquet file")
