"""Arrow schemas and checks for the data puma-ray reads and writes.

Interactions (Parquet; ``train``/``valid`` as separate URIs or one URI with a ``split`` column):
    user_id string, item_id string, label float32, item_text string,
    history_text list<string> (optional, CTR), timestamp int64 (optional), split string (optional)

Prompt store (Parquet): user_id string (unique), prompt fixed_size_list<float32>[l*d], with
Arrow schema metadata ``puma.*`` (see :class:`StoreMeta`).

Every check raises :class:`PumaError` with one line naming the URI and the problem.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from puma_ray import outputs, storage, templates
from puma_ray.errors import PumaError

FORMAT_VERSION = 1
TASKS = ("rating", "ctr")
LABEL_RANGE = {"rating": (1.0, 5.0), "ctr": (0.0, 1.0)}

REQUIRED_INTERACTION_COLUMNS = {
    "user_id": pa.string(),
    "item_id": pa.string(),
    "label": pa.float32(),
    "item_text": pa.string(),
}
OPTIONAL_INTERACTION_COLUMNS = {
    "history_text": pa.list_(pa.string()),
    "timestamp": pa.int64(),
    "split": pa.string(),
}


def interactions_schema(task: str) -> pa.Schema:
    """The schema puma-ray writes for interactions of ``task``."""
    fields = [pa.field(k, t, nullable=False) for k, t in REQUIRED_INTERACTION_COLUMNS.items()]
    if task == "ctr":
        fields.append(pa.field("history_text", OPTIONAL_INTERACTION_COLUMNS["history_text"]))
    fields.append(pa.field("timestamp", pa.int64()))
    return pa.schema(fields)


def _compatible(actual: pa.DataType, expected: pa.DataType) -> bool:
    if actual == expected:
        return True
    if pa.types.is_string(expected):
        return pa.types.is_string(actual) or pa.types.is_large_string(actual)
    if pa.types.is_floating(expected):
        return pa.types.is_floating(actual) or pa.types.is_integer(actual)
    if pa.types.is_integer(expected):
        return pa.types.is_integer(actual)
    if pa.types.is_list(expected):
        return (pa.types.is_list(actual) or pa.types.is_large_list(actual)) and _compatible(
            actual.value_type, expected.value_type
        )
    return False


def check_interactions_schema(uri: str, schema: pa.Schema) -> None:
    """Column names and types of an interactions input; raises PumaError naming the column."""
    for name, typ in {**REQUIRED_INTERACTION_COLUMNS}.items():
        if name not in schema.names:
            raise PumaError(f"{uri}: interactions lack required column {name!r} (have {schema.names})")
        if not _compatible(schema.field(name).type, typ):
            raise PumaError(f"{uri}: column {name!r} has type {schema.field(name).type}, expected {typ}")
    for name, typ in OPTIONAL_INTERACTION_COLUMNS.items():
        if name in schema.names and not _compatible(schema.field(name).type, typ):
            raise PumaError(f"{uri}: column {name!r} has type {schema.field(name).type}, expected {typ}")


def check_interaction_values(uri: str, task: str, batch: pa.Table | pa.RecordBatch) -> None:
    """Per-batch value checks (called on every batch read): nulls and label range (of the columns read)."""
    for name in (n for n in REQUIRED_INTERACTION_COLUMNS if n in batch.schema.names):
        nulls = batch.column(name).null_count
        if nulls:
            raise PumaError(f"{uri}: column {name!r} has {nulls} null value(s)")
    lo, hi = LABEL_RANGE[task]
    labels = np.asarray(batch.column("label").to_numpy(zero_copy_only=False), dtype=np.float64)
    bad = ~np.isfinite(labels) | (labels < lo) | (labels > hi)
    if task == "ctr":
        bad |= (labels != 0) & (labels != 1)
    if bad.any():
        ex = labels[bad][:3].tolist()
        want = "1..5" if task == "rating" else "0 or 1"
        raise PumaError(f"{uri}: {int(bad.sum())} label(s) outside the {task} range {want}, e.g. {ex}")


def stat_range(md: pq.FileMetaData, column: str) -> tuple[float, float] | None:
    """(smallest min, largest max) of a numeric column (or of a list column's values) over the row
    groups of a Parquet file, from the footer's statistics; None when no row group has them. NaN is
    never in them (Parquet leaves it out of min and max); an infinity is."""
    leaves = [i for i in range(md.num_columns) if md.schema.column(i).path.split(".")[0] == column]
    low, high = math.inf, -math.inf
    for rg in range(md.num_row_groups):
        for i in leaves:
            stats = md.row_group(rg).column(i).statistics
            if stats is not None and stats.has_min_max:
                low, high = min(low, float(stats.min)), max(high, float(stats.max))
    return (low, high) if low <= high else None


def check_interactions_input(uri: str, task: str) -> int:
    """An interactions input checked before any work (no Ray), from its Parquet footers: the columns
    and their types, every file's footer (a truncated file is refused here, not mid-run), at least
    one row, and labels inside the task's range as far as the footers' statistics show (a file whose
    statistics show one outside has its labels read, and the first ones are named). NaN is in no
    statistic: :func:`check_interaction_values`, on every batch read, finds it. Returns the rows."""
    outputs.check_published(uri)
    check_interactions_schema(uri, storage.read_schema(uri))
    footers = storage.parquet_footers(uri)
    rows = sum(md.num_rows for _, md in footers)
    if rows == 0:
        raise PumaError(f"{uri}: empty input (0 interactions)")
    lo, hi = LABEL_RANGE[task]
    for file, md in footers:
        seen = stat_range(md, "label")
        if seen is not None and (seen[0] < lo or seen[1] > hi):
            check_interaction_values(uri, task, storage.read_table(file, columns=["label"]))
    return rows


def normalize_interactions(batch: pa.Table) -> pa.Table:
    """Cast compatible types to the canonical ones (large_string -> string, int label -> float32)."""
    cols, names = [], []
    for name in batch.schema.names:
        col = batch.column(name)
        want = {**REQUIRED_INTERACTION_COLUMNS, **OPTIONAL_INTERACTION_COLUMNS}.get(name)
        if want is not None and col.type != want:
            col = pc.cast(col, want)
        cols.append(col)
        names.append(name)
    return pa.table(cols, names=names)


# ---------------------------------------------------------------------------------------------
# Prompt stores


@dataclass(frozen=True)
class StoreMeta:
    """What a prompt store was made for. Stored as Arrow schema metadata ``puma.<field>``."""

    model: str  # model name or path it was trained/migrated for
    model_fingerprint: str  # see identity.model_fingerprint
    hidden_size: int  # d
    prompt_length: int  # l
    template: str  # a built-in template id, or the template's text (puma_ray.templates)
    stage: str  # "prompts" (stage 1), "rewrite" (PUMA), ...
    format_version: int = FORMAT_VERSION
    template_hash: str = ""  # sha256 of the template text (16 hex); "": derived from ``template``

    def __post_init__(self):
        if not self.template_hash:  # a built-in id's text as this version has it, or the text itself
            object.__setattr__(self, "template_hash", templates.spec_hash(self.template))

    @property
    def width(self) -> int:
        return self.hidden_size * self.prompt_length

    def to_metadata(self) -> dict[bytes, bytes]:
        return {f"puma.{k}".encode(): json.dumps(v).encode() for k, v in asdict(self).items()}

    @classmethod
    def from_metadata(cls, uri: str, metadata: dict[bytes, bytes] | None) -> "StoreMeta":
        md = {k.decode(): v for k, v in (metadata or {}).items() if k.startswith(b"puma.")}
        optional = ("template_hash",)  # stores written before it was recorded: derived from the template
        missing = [f for f in cls.__dataclass_fields__ if f"puma.{f}" not in md and f not in optional]
        if missing:
            raise PumaError(
                f"{uri}: not a puma-ray prompt store (schema metadata lacks {['puma.' + m for m in missing]})"
            )
        meta = cls(**{f: json.loads(md[f"puma.{f}"]) for f in cls.__dataclass_fields__ if f"puma.{f}" in md})
        if meta.format_version != FORMAT_VERSION:
            raise PumaError(
                f"{uri}: prompt store format version {meta.format_version}, this puma-ray reads {FORMAT_VERSION}"
            )
        return meta


def prompt_store_schema(meta: StoreMeta) -> pa.Schema:
    return pa.schema(
        [
            pa.field("user_id", pa.string(), nullable=False),
            pa.field("prompt", pa.list_(pa.float32(), meta.width), nullable=False),
        ],
        metadata=meta.to_metadata(),
    )


def prompt_table(meta: StoreMeta, user_ids: list[str] | np.ndarray, prompts: np.ndarray) -> pa.Table:
    """(N,) ids + (N, l*d) float32 prompts -> a prompt-store table carrying ``meta``."""
    prompts = np.ascontiguousarray(prompts, dtype=np.float32)
    if prompts.ndim != 2 or prompts.shape[1] != meta.width:
        raise PumaError(f"prompt array has shape {prompts.shape}, expected (N, {meta.width})")
    flat = pa.FixedSizeListArray.from_arrays(pa.array(prompts.reshape(-1)), meta.width)
    return pa.Table.from_arrays([pa.array(user_ids, pa.string()), flat], schema=prompt_store_schema(meta))


def check_prompt_values(uri: str, meta: StoreMeta, table: pa.Table) -> np.ndarray:
    """Shape, finiteness and id-uniqueness of a prompt table. Returns prompts as (N, l*d) float32."""
    check_prompt_column(uri, meta, table.schema.field("prompt").type)
    if table.num_rows == 0:
        raise PumaError(f"{uri}: empty prompt store (0 users)")
    check_user_ids(uri, table.column("user_id"))
    return decode_prompts(table, meta.width, where=uri)


def check_prompt_column(uri: str, meta: StoreMeta, typ: pa.DataType) -> None:
    """A prompt column's type is fixed_size_list[l*d] as the store's metadata says; else one line."""
    if not pa.types.is_fixed_size_list(typ) or typ.list_size != meta.width:
        raise PumaError(
            f"{uri}: prompt column is {typ}, expected fixed_size_list<float32>[{meta.width}] "
            f"(l={meta.prompt_length} x d={meta.hidden_size})"
        )


def check_user_ids(uri: str, ids: pa.Array | pa.ChunkedArray) -> None:
    """A prompt store's user ids (of ``uri``) hold no null and no user twice; else one line naming a few."""
    if ids.null_count:
        raise PumaError(f"{uri}: {ids.null_count} null user_id(s)")
    n_unique = pc.count_distinct(ids).as_py()
    if n_unique != len(ids):
        dup = [v["values"] for v in pc.value_counts(ids).to_pylist() if v["counts"] > 1][:3]
        raise PumaError(f"{uri}: {len(ids) - n_unique} duplicate user_id row(s), e.g. {dup}")


def store_user_ids(uri: str) -> pa.Array:
    """The user ids of a prompt store (its user_id column, read here: no prompt is), checked by
    :func:`check_user_ids`."""
    ids = storage.read_table(uri, columns=["user_id"]).column("user_id").combine_chunks()
    check_user_ids(uri, ids)
    return ids


def decode_prompts(batch, width: int, where: str = "", what: str = "prompt", column: str = "prompt") -> np.ndarray:
    """A batch's prompt column -> (N, width) float32, refusing a wrong width and NaN/Inf (naming users).

    The one place prompts are decoded. ``batch``: an Arrow table / record batch (a
    fixed_size_list<float32> column) or a Ray Data numpy batch (an (N, width) array, or an object
    array of (width,) arrays); with a ``user_id`` column. ``where`` and ``what`` name them in errors."""
    cells = batch[column]
    if isinstance(cells, (pa.ChunkedArray, pa.Array)):
        cells = cells.combine_chunks() if isinstance(cells, pa.ChunkedArray) else cells
        n, flat = len(cells), cells.flatten().to_numpy(zero_copy_only=False)
    else:
        n, flat = len(cells), np.stack(cells) if cells.dtype == object and len(cells) else cells
    prompts = np.asarray(flat, dtype=np.float32)
    if not prompts.flags.writeable:  # a zero-copy view of Arrow memory; torch wants its own
        prompts = prompts.copy()
    prefix = f"{where}: " if where else ""
    if prompts.size != n * width:
        raise PumaError(f"{prefix}{what}s have width {prompts.size // max(n, 1)}, expected l*d = {width}")
    prompts = prompts.reshape(n, width)
    bad = ~np.isfinite(prompts).all(axis=1)
    if bad.any():
        ids = np.asarray(batch["user_id"].to_pylist() if hasattr(batch["user_id"], "to_pylist") else batch["user_id"])
        users = list(dict.fromkeys(ids[bad].tolist()))[:3]  # a user's prompt joined to several rows: named once
        raise PumaError(f"{prefix}{int(bad.sum())} {what}(s) contain NaN or Inf, e.g. users {users}")
    return prompts


def write_prompt_store(uri: str, meta: StoreMeta, user_ids, prompts: np.ndarray) -> None:
    """Write a prompt store file (``uri`` ends in .parquet) or ``uri/part-00000.parquet``."""
    target = uri if uri.endswith(".parquet") else storage.join(uri, "part-00000.parquet")
    storage.write_table(target, prompt_table(meta, user_ids, prompts))


def read_store_meta(uri: str) -> StoreMeta:
    """A prompt store's metadata, from Parquet footers only (no prompt is read)."""
    return StoreMeta.from_metadata(uri, storage.read_schema(uri).metadata)


def check_store_input(uri: str) -> StoreMeta:
    """A prompt store checked before any work (no Ray), from its Parquet footers: its metadata, a
    prompt column as wide as the metadata says, every file's footer (a truncated file is refused
    here), at least one user, and no infinite prompt value as far as the footers' statistics show (a
    file whose statistics show one has its prompts decoded, and the users are named). NaN is in no
    statistic: :func:`decode_prompts` finds it where prompts are read. Returns the metadata."""
    outputs.check_published(uri)
    schema = storage.read_schema(uri)
    meta = StoreMeta.from_metadata(uri, schema.metadata)
    typ = schema.field("prompt").type if "prompt" in schema.names else None
    if "user_id" not in schema.names or typ is None or not pa.types.is_fixed_size_list(typ):
        raise PumaError(f"{uri}: not a prompt store (columns {schema.names}; expected user_id and prompt)")
    check_prompt_column(uri, meta, typ)
    footers = storage.parquet_footers(uri)
    if sum(md.num_rows for _, md in footers) == 0:
        raise PumaError(f"{uri}: empty prompt store (0 users)")
    for file, md in footers:
        seen = stat_range(md, "prompt")
        if seen is not None and not (math.isfinite(seen[0]) and math.isfinite(seen[1])):
            decode_prompts(storage.read_table(file, columns=["user_id", "prompt"]), meta.width, where=uri)
    return meta


def read_prompt_store(uri: str, expect_fingerprint: str | None = None) -> tuple[StoreMeta, list[str], np.ndarray]:
    """Read and validate a prompt store -> (meta, user ids, (N, l*d) float32 prompts).

    ``expect_fingerprint``: refuse a store made for another model.
    """
    meta = read_store_meta(uri)
    if expect_fingerprint is not None and meta.model_fingerprint != expect_fingerprint:
        raise PumaError(
            f"{uri}: prompt store was made for model {meta.model!r} (fingerprint {meta.model_fingerprint}, "
            f"d={meta.hidden_size}); the model given has fingerprint {expect_fingerprint}"
        )
    table = storage.read_table(uri)
    prompts = check_prompt_values(uri, meta, table)
    return meta, table.column("user_id").to_pylist(), prompts
