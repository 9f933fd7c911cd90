"""URIs -> pyarrow filesystems. The only module that opens files.

A URI is a plain path, ``file:///abs/path`` or ``s3://bucket/prefix``. S3 credentials come
only from the standard AWS chain (environment, shared config/credentials files, instance
roles) as resolved by pyarrow/boto; they are never read into, or printed from, puma-ray.
The endpoint can be overridden (MinIO, a local moto server) with ``AWS_ENDPOINT_URL`` or
:func:`set_s3_endpoint` (config key ``storage.s3_endpoint``).
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Iterator
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from puma_ray.errors import PumaError

_S3_ENDPOINT_ENV = "AWS_ENDPOINT_URL"
# A dead endpoint fails in seconds, not minutes: connect timeout, stall (no-progress) timeout and
# attempts per request. The stall timeout is the AWS SDK's own default; override with env vars.
S3_CONNECT_TIMEOUT_S = float(os.environ.get("PUMA_S3_CONNECT_TIMEOUT", 2))
S3_REQUEST_TIMEOUT_S = float(os.environ.get("PUMA_S3_REQUEST_TIMEOUT", 3))
S3_MAX_ATTEMPTS = int(os.environ.get("PUMA_S3_MAX_ATTEMPTS", 3))
# The AWS SDK writes an error response's body (S3's XML) into the buffer that a ranged read provides:
# a read smaller than that (a small JSON or Parquet file) then fails with this message, which the SDK
# files as a non-retryable INTERNAL_FAILURE whatever the status was (a 503 SlowDown included). The
# reads here retry it themselves (S3_MAX_ATTEMPTS in all, backoff below S3_READ_BACKOFF_S).
_MISFILED = "Failed to flush response stream"
S3_READ_BACKOFF_S = 2.0
_SECRET_ENVS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")  # redacted from messages, should one echo them
_DENIED = (
    "ACCESS_DENIED",
    "INVALID_ACCESS_KEY_ID",
    "SIGNATURE_DOES_NOT_MATCH",
    "EXPIRED_TOKEN",
    "INVALID_CLIENT_TOKEN_ID",
    "UNRECOGNIZED_CLIENT",
    "HTTP status 403",
)


def set_s3_endpoint(endpoint: str | None) -> None:
    """Route every s3:// URI of this process (and Ray workers it starts) to ``endpoint``."""
    if endpoint:
        os.environ[_S3_ENDPOINT_ENV] = endpoint


def _s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(_S3_ENDPOINT_ENV)


def _s3_filesystem() -> pafs.S3FileSystem:
    endpoint = _s3_endpoint()
    kwargs: dict = {
        "region": os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1",
        "connect_timeout": S3_CONNECT_TIMEOUT_S,
        "request_timeout": S3_REQUEST_TIMEOUT_S,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS),
    }
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "http"
    # Credentials: pyarrow's S3 client walks the standard AWS chain itself.
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """``uri`` -> (filesystem, path inside it). Raises PumaError for an unsupported scheme."""
    if not uri:
        raise PumaError("empty storage URI")
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise PumaError(f"{uri}: an s3 URI needs a bucket (s3://bucket/prefix)")
        return _s3_filesystem(), f"{parsed.netloc}/{parsed.path.lstrip('/')}".rstrip("/")
    if parsed.scheme == "file":
        return pafs.LocalFileSystem(), os.path.abspath(parsed.path)
    if parsed.scheme and len(parsed.scheme) > 1:  # a one-letter scheme is a Windows drive
        raise PumaError(f"{uri}: unsupported URI scheme {parsed.scheme!r} (use a path, file:// or s3://)")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI with '/' (works for s3:// and local paths)."""
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def absolute(uri: str) -> str:
    """A local path made absolute (``~`` expanded); a URI with a scheme (s3://, file://) as given.
    Configs apply it to every storage URI: Ray workers run in other working directories."""
    return uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))


def _not_found(uri: str) -> PumaError:
    """'not found', or 'bucket ... does not exist' when it is the bucket that is missing (s3://)."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        try:
            gone = _s3_filesystem().get_file_info(parsed.netloc).type == pafs.FileType.NotFound
        except OSError:
            gone = False
        if gone:
            return PumaError(f"{uri}: bucket {parsed.netloc!r} does not exist")
    return PumaError(f"{uri}: not found")


def _describe(uri: str, exc: BaseException) -> PumaError:
    """A one-line error for a storage failure; never includes credentials."""
    exc = getattr(exc, "cause", None) or exc  # a Ray task error: the original exception
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    aws = re.search(r"AWS Error (.+?) during (\w+) operation: ?(.*)", msg)
    bucket = re.search(r"Bucket '([^']+)' not found", msg)
    if bucket:
        msg = f"bucket {bucket.group(1)!r} does not exist"
    elif aws and any(code in aws.group(1) for code in _DENIED):
        msg = (
            f"access denied ({aws.group(1)} on {aws.group(2)}): check the AWS credentials and the bucket's permissions"
        )
    elif aws and "NETWORK_CONNECTION" in aws.group(1):
        detail = aws.group(3).split("Details: ")[-1]
        where = _s3_endpoint() or "(AWS default)"
        msg = f"cannot reach the S3 endpoint {where} after {S3_MAX_ATTEMPTS} attempt(s): {detail}"
    elif aws and _MISFILED in aws.group(3):
        msg = (
            f"the S3 endpoint answered {aws.group(2)} with an error after {S3_MAX_ATTEMPTS} attempt(s) "
            f"(the AWS SDK lost its status: {aws.group(3).strip()})"
        )
    elif aws and re.search(r"HTTP status 5\d\d|INTERNAL_FAILURE|SLOW_DOWN|SERVICE_UNAVAILABLE|THROTTL", aws.group(1)):
        detail = aws.group(3).replace("No response body.", "").strip()
        msg = f"the S3 endpoint failed {aws.group(2)} after {S3_MAX_ATTEMPTS} attempt(s): {aws.group(1)}" + (
            f" ({detail})" if detail else ""
        )
    elif "magic bytes not found" in msg or "deserialize thrift" in msg:
        name = re.search(r"source '([^']+)'", msg)
        file = f" {name.group(1)}" if name else ""
        msg = f"truncated or corrupt Parquet file{file} ({msg.rsplit(': ', 1)[-1].rstrip('.')})"
    for name in _SECRET_ENVS:
        if os.environ.get(name):
            msg = msg.replace(os.environ[name], "***")
    return PumaError(f"{uri}: {msg}")


@contextmanager
def _errors(uri: str) -> Iterator[None]:
    """Turn filesystem/Arrow failures on ``uri`` (also inside Ray tasks) into one-line PumaErrors naming it."""
    try:
        yield
    except FileNotFoundError:
        raise _not_found(uri) from None
    except (OSError, pa.ArrowInvalid) as exc:
        if isinstance(getattr(exc, "cause", None), FileNotFoundError):
            raise _not_found(uri) from None
        raise _describe(uri, exc) from None


def _reading(read):
    """``read()``, tried up to S3_MAX_ATTEMPTS times while it fails with the AWS SDK's misfiled
    transient error (:data:`_MISFILED`), with jittered exponential backoff. Only for reads that can
    start over: whole files, footers (not the row groups a ParquetFile reads later, nor the chunks of
    :func:`open_input_stream`: a small one of those still fails on a 5xx)."""
    for attempt in range(1, S3_MAX_ATTEMPTS + 1):
        try:
            return read()
        except OSError as exc:
            if attempt == S3_MAX_ATTEMPTS or _MISFILED not in str(exc):
                raise
        time.sleep(random.uniform(0, min(S3_READ_BACKOFF_S, 0.1 * 2**attempt)))


def _make_parent(fs: pafs.FileSystem, path: str) -> None:
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.create_dir(parent, recursive=True)


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    with _errors(uri):
        return fs.get_file_info(path).type != pafs.FileType.NotFound


def makedirs(uri: str) -> None:
    fs, path = resolve(uri)
    with _errors(uri):
        fs.create_dir(path, recursive=True)


def delete_dir(uri: str) -> None:
    fs, path = resolve(uri)
    with _errors(uri):
        if fs.get_file_info(path).type == pafs.FileType.Directory:
            fs.delete_dir(path)


def delete_file(uri: str) -> None:
    fs, path = resolve(uri)
    with _errors(uri):
        if fs.get_file_info(path).type == pafs.FileType.File:
            fs.delete_file(path)


def move(src: str, dst: str) -> None:
    """Move one file ``src`` -> ``dst`` on the same filesystem (local: a rename; S3: copy + delete),
    replacing ``dst``."""
    fs, path = resolve(src)
    _, to = resolve(dst)
    with _errors(src):
        _make_parent(fs, to)
        fs.move(path, to)


def list_files(uri: str, suffix: str = "") -> list[str]:
    """Files under a directory URI (recursive, sorted), as URIs."""
    fs, path = resolve(uri)
    with _errors(uri):
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    rel = sorted(
        i.path[len(path) :].lstrip("/") for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix)
    )
    return [join(uri, r) for r in rel]


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = resolve(uri)
    with _errors(uri):
        _make_parent(fs, path)
        with fs.open_output_stream(path) as out:
            out.write(data)


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)

    def read() -> bytes:
        with fs.open_input_stream(path) as f:
            return f.read()

    with _errors(uri):
        return _reading(read)


def write_json(uri: str, obj) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(uri: str):
    try:
        return json.loads(read_bytes(uri))
    except json.JSONDecodeError as exc:
        raise PumaError(f"{uri}: not valid JSON ({exc})") from None


class _DigestSink(io.RawIOBase):
    """A write-only stream that feeds every byte to ``digest`` on its way to ``sink``."""

    def __init__(self, sink, digest):
        self.sink, self.digest, self.size = sink, digest, 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.digest.update(b)
        self.sink.write(b)
        self.size += len(b)
        return len(b)

    def tell(self) -> int:
        return self.size


def _float_vector(f: pa.Field) -> bool:
    return (pa.types.is_list(f.type) or pa.types.is_fixed_size_list(f.type)) and pa.types.is_floating(f.type.value_type)


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """Columns worth dictionary encoding: all but float vectors (a prompt's floats never repeat; trying
    made encoding a 20k x 384 prompt file 18% slower and small stores' files ~1.5x larger)."""
    return [f.name for f in schema if not _float_vector(f)]


def split_columns(schema: pa.Schema) -> list[str]:
    """The Parquet leaf paths of float vectors (a prompt column ``prompt`` -> ``prompt.list.element``),
    written BYTE_STREAM_SPLIT before zstd: a float's exponent bytes then sit together and compress; on a
    20k x 384 prompt file, encoding took 0.46x the time, decoding 0.21x and the file 0.92x the bytes
    (benchmarks/RESULTS.md, "Parquet encodings of prompts")."""
    return [f"{f.name}.list.element" for f in schema if _float_vector(f)]


@contextmanager
def parquet_writer(uri: str, schema: pa.Schema, digest=None) -> Iterator[pq.ParquetWriter]:
    """Stream record batches into one Parquet file at ``uri``; ``digest`` (a hashlib object), if
    given, sees every byte written, so a checksum costs no second read."""
    fs, path = resolve(uri)
    with _errors(uri):
        _make_parent(fs, path)
        with fs.open_output_stream(path) as sink:
            where = sink if digest is None else pa.PythonFile(_DigestSink(sink, digest), mode="w")
            with pq.ParquetWriter(
                where,
                schema,
                compression="zstd",
                use_dictionary=dictionary_columns(schema),
                use_byte_stream_split=split_columns(schema),
            ) as writer:
                yield writer


def stat(uri: str) -> dict:
    """{"size": bytes, "mtime": ISO time or None} of one file."""
    fs, path = resolve(uri)
    with _errors(uri):
        info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise PumaError(f"{uri}: not found")
    return {"size": info.size, "mtime": info.mtime.isoformat() if info.mtime else None}


def parquet_file(uri: str) -> pq.ParquetFile:
    """An open Parquet file (footer read; row groups read on demand)."""
    fs, path = resolve(uri)
    with _errors(uri):
        return _reading(lambda: pq.ParquetFile(fs.open_input_file(path)))


def parquet_files(uri: str) -> list[str]:
    """The Parquet file(s) at ``uri``: the file itself, or those under a directory."""
    return [uri] if uri.endswith(".parquet") else list_files(uri, ".parquet")


def parquet_footers(uri: str) -> list[tuple[str, pq.FileMetaData]]:
    """(file, footer) of each Parquet file at ``uri`` (a file or a directory), read by up to 16
    threads (on S3 each is a request); a truncated or corrupt file is a one-line PumaError naming it."""
    files = parquet_files(uri)
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(files)))) as pool:
        return list(zip(files, pool.map(lambda f: parquet_file(f).metadata, files)))


def parquet_rows(uri: str) -> int:
    """Rows of the Parquet file(s) at ``uri`` (a file or a directory), from their footers."""
    return sum(md.num_rows for _, md in parquet_footers(uri))


def write_table(uri: str, table: pa.Table) -> None:
    with parquet_writer(uri, table.schema) as w:
        w.write_table(table)


def read_table(uri: str, columns: list[str] | None = None, filters=None) -> pa.Table:
    """Read a Parquet file or directory of Parquet files into one table (small inputs only);
    ``filters`` as in pyarrow.parquet.read_table (rows outside are never materialised)."""
    fs, path = resolve(uri)
    with _errors(uri):
        return _reading(lambda: pq.read_table(path, filesystem=fs, columns=columns, filters=filters))


def read_schema(uri: str) -> pa.Schema:
    """The Arrow schema (with metadata) of a Parquet file or directory, from footers only."""
    fs, path = resolve(uri)
    with _errors(uri):
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise _not_found(uri)
        files = (
            [path]
            if info.type == pafs.FileType.File
            else sorted(
                i.path
                for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                if i.type == pafs.FileType.File and i.path.endswith(".parquet")
            )
        )
        if not files:
            raise PumaError(f"{uri}: empty input (no .parquet files)")
        return _reading(lambda: pads.dataset(files[0], filesystem=fs, format="parquet").schema)


def ray_read_parquet(uri: str, **kwargs):
    """A Ray Dataset over the Parquet file(s) at ``uri`` (streamed, never collected)."""
    import ray.data  # noqa: PLC0415 -- heavy (seconds), and the commands without Ray (data synth/import) use this module

    fs, path = resolve(uri)
    with _errors(uri):  # files are listed and footers read here, on the driver
        if fs.get_file_info(path).type == pafs.FileType.NotFound:  # fail before Ray's listing threads start
            raise FileNotFoundError(path)
        return ray.data.read_parquet(path, filesystem=fs, **kwargs)


@contextmanager
def open_input_stream(uri: str, compression: str | None = "detect") -> Iterator[io.BufferedReader]:
    """A buffered binary stream over one file, decompressed by its extension (.gz, .bz2, .zst, ...)
    unless ``compression`` says otherwise; failures while opening or reading it become one-line
    PumaErrors naming ``uri``."""
    fs, path = resolve(uri)
    with _errors(uri), fs.open_input_stream(path, compression=compression) as raw:
        yield io.BufferedReader(raw, 1 << 20)
