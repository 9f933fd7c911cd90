"""Storage faults (issue 25, item 4): an S3 endpoint that fails a fraction of its requests.

tests/faulty_s3.py puts a proxy in front of the suite's moto server that answers some requests with
HTTP 500 InternalError, 503 ServiceUnavailable or 503 SlowDown (throttling), drops the connection
without a response, or cuts a response off mid-body. Through it, the bulk rewrite (driver and Ray
actors) and a data import finish with the same result as without faults; an endpoint that fails
every request ends them with one error line naming the URI, without credentials, in seconds.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections import Counter

import pyarrow as pa
import pytest
import ray
from conftest import random_store
from faulty_s3 import TRANSIENT, FaultyS3
from test_rewrite import job

from puma_ray import storage
from puma_ray.cli import main
from puma_ray.config import ImportOptions, RayConfig, RewriteJobConfig, build
from puma_ray.datasets.importers import import_interactions
from puma_ray.errors import PumaError
from puma_ray.rewrite import rewrite
from puma_ray.runtime import init_ray

SECRET = "testing-secret-do-not-print"  # the s3_server fixture's AWS_SECRET_ACCESS_KEY
RATE = 0.15  # the fraction of requests faulted
IMPORT_OPTS = ImportOptions(min_item_interactions=2, min_user_interactions=3, buckets=4)


@pytest.fixture(scope="module")
def proxy(s3_server):
    """The fault proxy in front of moto; this module's s3:// URIs go through it (AWS_ENDPOINT_URL)."""
    server = FaultyS3(s3_server).start()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ENDPOINT_URL", server.endpoint)
        yield server
    server.stop()


@pytest.fixture
def faulty_s3(proxy):
    """The proxy, faults off and counters zeroed (the test turns faults on)."""
    proxy.clear()
    yield proxy
    proxy.clear()


@pytest.fixture(scope="module")
def ray_via_proxy(ray_session, proxy, s3_server):
    """The suite's Ray restarted so that its workers (the rewrite's actors) inherit the proxy's
    endpoint; restarted again afterwards with moto's, for the modules after this one."""
    ray.shutdown()
    init_ray(RayConfig(num_cpus=4))
    yield
    ray.shutdown()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ENDPOINT_URL", s3_server)
        init_ray(RayConfig(num_cpus=4))


def _faulted(proxy: FaultyS3) -> dict[str, int]:
    """The faults the proxy injected, asserted to include every transient kind."""
    counts = dict(proxy.injected)
    assert set(counts) == set(TRANSIENT) and min(counts.values()) > 0, counts
    return counts


def _prompts(out: str):
    """OUT/prompts read back (user_id, prompt), sorted by user."""
    table = storage.read_table(storage.join(out, "prompts"), columns=["user_id", "prompt"])
    return table.sort_by("user_id")


@ray.remote
def _worker_endpoint() -> str | None:
    return storage._s3_endpoint()


def test_rewrite_survives_transient_faults(tmp_path, tiny_models, s3_bucket, faulty_s3, ray_via_proxy):
    """An s3:// source rewritten to s3:// through the faults: every user exactly once, prompts
    equal to the same rewrite without faults, and every file's checksum that of its bytes."""
    assert ray.get(_worker_endpoint.remote()) == faulty_s3.endpoint  # the actors' requests go through it too
    n = 300
    src = random_store(f"{s3_bucket}/src", tiny_models["llama"], n, rows_per_group=25)
    sizes = {"min_rows_per_file": 50, "max_rows_per_file": 50, "actors": 1}
    clean_cfg = job(tmp_path, tiny_models, src, f"{s3_bucket}/clean", **sizes)
    cfg = build(RewriteJobConfig, {**clean_cfg.model_dump(), "output": f"{s3_bucket}/faulty"})  # the same adapter
    clean = rewrite(clean_cfg)

    faulty_s3.transient(RATE)
    t0 = time.time()
    manifest = rewrite(cfg)
    wall = time.time() - t0
    faults, seen = _faulted(faulty_s3), list(faulty_s3.seen)
    faulty_s3.clear()

    assert any(line.startswith("PUT /") and "/faulty/" in line and ".parquet" in line for line in seen), seen[:20]
    assert manifest["output"]["rows"] == clean["output"]["rows"] == n
    assert storage.read_json(f"{cfg.output}/manifest.json")["output"]["rows"] == n
    got, want = _prompts(cfg.output), _prompts(clean_cfg.output)
    ids = got.column("user_id").to_pylist()
    assert len(ids) == len(set(ids)) == n
    assert ids == sorted(storage.read_table(src, columns=["user_id"]).column("user_id").to_pylist())
    assert got.equals(want)
    for f in manifest["output"]["files"]:
        assert hashlib.sha256(storage.read_bytes(f["uri"])).hexdigest() == f["sha256"], f["uri"]
    methods = Counter(line.split(" ", 1)[0] for line in seen)
    print(f"rewrite: {len(seen)} requests {dict(methods)}, faults {faults}, {wall:.1f} s")


def _movielens_100k(n_users: int = 40, n_items: int = 30, seed: int = 0) -> dict[str, bytes]:
    """A MovieLens-100k-like release: u.data (user TAB item TAB rating TAB time), u.item (latin-1)."""
    rng = random.Random(seed)
    lines = []
    for u in range(1, n_users + 1):
        for j, i in enumerate(rng.sample(range(1, n_items + 1), rng.randint(4, 12))):
            lines.append(f"{u}\t{i}\t{rng.randint(1, 5)}\t{874_965_758 + 3_600 * u + 60 * j}\n")
    items = [
        f"{i}|Film {i}, Le ({1990 + i % 9})|01-Jan-1995||http://example.invalid|0|1|0\n" for i in range(1, n_items)
    ]
    return {"u.data": "".join(lines).encode(), "u.item": "".join(items).encode("latin-1")}


def _upload(prefix: str, files: dict[str, bytes]) -> str:
    for name, data in files.items():
        storage.write_bytes(storage.join(prefix, name), data)
    return prefix


def _contents(out: str) -> dict[str, bytes]:
    """Every file under ``out``: path relative to it -> bytes."""
    return {uri[len(out) + 1 :]: storage.read_bytes(uri) for uri in storage.list_files(out)}


def test_import_survives_transient_faults(s3_bucket, faulty_s3):
    """A MovieLens import from s3:// to s3:// through the faults writes the same bytes (and the
    same meta.json) as the import without faults."""
    src = _upload(f"{s3_bucket}/ml-100k", _movielens_100k())
    clean = import_interactions("movielens", src, f"{s3_bucket}/clean", IMPORT_OPTS)

    faulty_s3.transient(RATE)
    out = f"{s3_bucket}/faulty"
    meta = import_interactions("movielens", src, out, IMPORT_OPTS)
    faults, seen = _faulted(faulty_s3), list(faulty_s3.seen)
    faulty_s3.clear()

    assert meta == clean and meta["complete"] and meta["rows"]["train"] > 0
    got, want = _contents(out), _contents(f"{s3_bucket}/clean")
    assert sorted(got) == sorted(want) and any(name.startswith("train/") for name in got)
    assert got == want
    methods = Counter(line.split(" ", 1)[0] for line in seen)
    print(f"import: {len(seen)} requests {dict(methods)}, faults {faults}")


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("internal", ("HTTP status 500", f"after {storage.S3_MAX_ATTEMPTS} attempt(s)")),
        ("denied", ("access denied", "credentials")),
    ],
)
def test_permanent_errors_end_in_one_line(s3_bucket, faulty_s3, capsys, kind, words):
    """Every request failing (HTTP 500, or 403 AccessDenied): storage calls and `puma-ray data
    import` end in one line naming the URI, without the secret, within seconds (bounded retries)."""
    src = _upload(f"{s3_bucket}/ml-100k", _movielens_100k(n_users=5))
    faulty_s3.permanent(kind)
    t0 = time.time()
    for fn, uri in (
        (storage.read_bytes, f"{src}/u.data"),
        (storage.read_table, f"{s3_bucket}/store"),
        (lambda u: storage.write_json(u, {"a": 1}), f"{s3_bucket}/out/meta.json"),
    ):
        with pytest.raises(PumaError) as e:
            fn(uri)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"{uri}: ") and SECRET not in msg, msg
        assert all(w in msg for w in words), msg
    argv = ["data", "import", "--format", "movielens", "--src", src, "--out", f"{s3_bucket}/cli"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {src}"), err
    assert SECRET not in err and "Traceback" not in err and all(w in err for w in words), err
    assert time.time() - t0 < 30
    assert 0 < faulty_s3.injected[kind] == faulty_s3.requests
    print(f"permanent {kind}: {faulty_s3.injected[kind]} requests failed, {time.time() - t0:.1f} s: {err}")


@pytest.mark.parametrize("kind", ["internal", "unavailable", "slowdown"])
def test_small_reads_retry_server_errors(s3_bucket, faulty_s3, kind):
    """A 5xx answered to a read smaller than the error's XML body: the AWS SDK reports a
    non-retryable INTERNAL_FAILURE ("Failed to flush response stream") instead, which storage's
    whole-file and footer reads retry. Here every distinct request fails once, the GETs included."""
    table = pa.table({"user_id": ["u1", "u2"]})
    storage.write_json(f"{s3_bucket}/small.json", {"a": 1})
    storage.write_table(f"{s3_bucket}/small/part-0.parquet", table)
    faulty_s3.transient(1.0, kinds=(kind,), max_faults=1)
    assert storage.read_json(f"{s3_bucket}/small.json") == {"a": 1}
    assert storage.read_table(f"{s3_bucket}/small").equals(table)
    assert storage.parquet_rows(f"{s3_bucket}/small") == 2
    assert storage.read_schema(f"{s3_bucket}/small").names == ["user_id"]
    assert sum(line.startswith("GET /") for line in faulty_s3.seen) >= 4 and faulty_s3.injected[kind] >= 4
