"""Where a command may write: the one home of "no command destroys data it did not write".

Every command that writes (``prompts train``, ``prompts coldstart``, ``migrate``, ``rewrite``,
``tune``, ``evaluate``'s report, ``data import``, ``models import``) calls :func:`check_output`
at the start of its entry, before Ray starts and before anything is deleted:

1. The output must not be one of the command's inputs, inside one, or hold one
   (:func:`check_overlap`): local paths are compared made absolute, normalized and with symbolic
   links resolved, ``s3://bucket/key`` URIs by path components (``runs/source2`` is not inside
   ``runs/source``). No option lifts this.
2. A non-empty output must have been written by the same command before (its marker, below):
   then the command resumes or replaces it as it always did. Anything else is refused unless the
   user asks to overwrite (``--overwrite``, or ``output_mode: overwrite`` in a config).

The marker is ``OUTPUT/.puma-ray-output.json`` (:data:`MARKER`): the command and the sha256 of
the config that made it, written by :func:`mark_output` just before the command's first write
(a command refused by an earlier check leaves nothing behind). A one-file output (``evaluate``'s
JSON report) carries the same record under its ``"written_by"`` key (:func:`stamp`). The two
imports keep the markers they always had (``meta.json`` by puma_ray.importers, ``puma_import.json``),
and outputs written before markers existed are recognized by what each command always left there
(:data:`_EARLIER`: a run's summary.json stage, a rewrite's state, a search's search.json).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from typing import Callable, Iterable, Mapping
from urllib.parse import urlparse

import pyarrow.fs as pafs

from puma_ray import storage
from puma_ray.errors import PumaError

MARKER = ".puma-ray-output.json"
OVERWRITE_HINT = "pass --overwrite (or set output_mode: overwrite) to write into it anyway"
TOOL_OVERWRITE_HINT = "pass --overwrite to replace it"

# name (a config key) -> a URI, None (not given), a list of URIs or a mapping of name -> URI
Inputs = Mapping[str, object]


# ---------------------------------------------------------------------------------------------
# Overlap of an output with the inputs


def _parts(uri: str) -> tuple[str, ...]:
    """A URI -> comparable path components: ("s3", bucket, *key) or ("file", *absolute path)."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        key = posixpath.normpath("/" + parsed.path).strip("/")
        return ("s3", parsed.netloc, *(p for p in key.split("/") if p))
    _, path = storage.resolve(uri)  # PumaError for an unsupported scheme
    path = os.path.realpath(path)  # absolute, normalized, symbolic links resolved
    return ("file", *(p for p in path.replace(os.sep, "/").split("/") if p))


def _flatten(inputs: Inputs) -> list[tuple[str, str]]:
    """``{"sources": [a, b], "data.train": t, "compare": {"x": c}}`` -> [("sources[0]", a), ...]."""
    out = []
    for name, value in inputs.items():
        if value is None or value == "":
            continue
        if isinstance(value, str):
            out.append((name, value))
        elif isinstance(value, Mapping):
            out += [(f"{name}.{k}", v) for k, v in value.items() if v]
        else:
            out += [(f"{name}[{i}]", v) for i, v in enumerate(value) if v]
    return out


def local_model(path: str | None) -> str | None:
    """A model path as an input to compare: a local directory or file, or None (a hub id)."""
    if path and "://" not in path and os.path.exists(os.path.expanduser(path)):
        return path
    return None


def check_overlap(output: str, inputs: Inputs, allow_inside: Iterable[str] = (), what: str = "output") -> None:
    """PumaError (one line, naming both) when ``output`` is, lies inside, or holds any input.

    ``inputs``: name -> URI (or a list / mapping of URIs; None entries skipped); the name is what
    the message calls the input (a config key). ``allow_inside``: names of inputs the output may lie
    inside (a report file written beside a run it scores). ``what``: how the message calls ``output``."""
    out = _parts(output)
    allowed = set(allow_inside)
    for name, uri in _flatten(inputs):
        inp = _parts(uri)
        if inp == out:
            how = "is"
        elif inp == out[: len(inp)]:
            if name.split("[")[0].split(".")[0] in allowed or name in allowed:
                continue
            how = "is inside"
        elif out == inp[: len(out)]:
            how = "contains"
        else:
            continue
        raise PumaError(f"{what} {output} {how} the input {name} ({uri}); choose an output apart from every input")


# ---------------------------------------------------------------------------------------------
# Markers: which command wrote an output


def config_hash(config) -> str | None:
    """sha256 of a config (a pydantic model or a plain dict) as sorted JSON; None without one."""
    if config is None:
        return None
    data = config.model_dump(mode="json") if hasattr(config, "model_dump") else config
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def marker(command: str, config=None) -> dict:
    """The record an output keeps of the command (and config) that wrote it."""
    return {"generator": "puma-ray", "command": command, "config_sha256": config_hash(config)}


def read_record(uri: str):
    """A JSON record (marker, manifest, summary) -> its value; None when absent or unreadable."""
    try:
        return storage.read_json(uri) if storage.exists(uri) else None
    except PumaError:
        return None


def _summary_stage(stage: str) -> Callable[[str], bool]:
    return lambda out: (read_record(storage.join(out, "summary.json")) or {}).get("stage") == stage


# What each command left in its output before markers existed (outputs of earlier versions), and
# the imports' own markers.
_EARLIER: dict[str, Callable[[str], bool]] = {
    "prompts train": _summary_stage("prompts"),
    "prompts coldstart": _summary_stage("coldstart"),
    "migrate": _summary_stage("migrate"),
    "rewrite": lambda out: (
        storage.exists(storage.join(out, "rewrite_state", "plan.json"))
        and not storage.exists(storage.join(out, "summary.json"))
    ),
    "tune": lambda out: storage.exists(storage.join(out, "search.json")),
    "data import": lambda out: (
        (read_record(storage.join(out, "meta.json")) or {}).get("generator") == "puma_ray.importers"
    ),
    "models import": lambda out: storage.exists(storage.join(out, "puma_import.json")),
}


def written_by(output: str) -> str | None:
    """The command whose marker ``output`` holds (None: no marker)."""
    record = read_record(storage.join(output, MARKER))
    return record.get("command") if isinstance(record, dict) else None


def _kind(uri: str) -> pafs.FileType:
    fs, path = storage.resolve(uri)
    try:
        return fs.get_file_info(path).type
    except OSError as exc:
        raise PumaError(f"{uri}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def check_output(
    output: str,
    command: str,
    inputs: Inputs = {},
    overwrite: bool = False,
    hint: str = OVERWRITE_HINT,
) -> None:
    """Refuse (one-line PumaError) a directory ``output`` that ``command`` must not write into.

    Refused: an output that is, lies inside or holds an input (always); a file; a non-empty directory
    without the marker of ``command`` (unless ``overwrite``). Absent, empty, or written by ``command``
    before: accepted. Writes nothing."""
    check_overlap(output, inputs)
    kind = _kind(output)
    if kind == pafs.FileType.NotFound:
        return
    if kind != pafs.FileType.Directory:
        raise PumaError(f"{output}: exists and is not a directory; choose another output")
    if overwrite:
        return
    owner = written_by(output)
    if owner == command or (owner is None and command in _EARLIER and _EARLIER[command](output)):
        return
    if not storage.list_files(output):
        return
    by = f"was written by `puma-ray {owner}`" if owner else f"holds no output of `puma-ray {command}`"
    raise PumaError(f"{output}: not empty and {by}; choose another output, or {hint}")


def mark_output(output: str, command: str, config=None) -> None:
    """Record in ``output`` that ``command`` (with ``config``) writes it: call after
    :func:`check_output` and the command's other checks, before its first write."""
    storage.write_json(storage.join(output, MARKER), marker(command, config))


def check_output_file(
    output: str,
    command: str,
    inputs: Inputs = {},
    overwrite: bool = False,
    allow_inside: Iterable[str] = (),
) -> None:
    """:func:`check_output` for a one-file JSON output (a report): refused when it is, lies inside (but
    for ``allow_inside``) or holds an input, is a directory, or is an existing file that is not a
    ``command`` report (its ``"written_by"``; unless ``overwrite``). Writes nothing."""
    check_overlap(output, inputs, allow_inside)
    kind = _kind(output)
    if kind == pafs.FileType.NotFound:
        return
    if kind == pafs.FileType.Directory:
        raise PumaError(f"{output}: is a directory; the output is one JSON file")
    if overwrite:
        return
    try:
        record = json.loads(storage.read_bytes(output))
    except (json.JSONDecodeError, UnicodeDecodeError):
        record = None
    owner = (record.get("written_by") or {}).get("command") if isinstance(record, dict) else None
    earlier = command == "evaluate" and isinstance(record, dict) and {"task", "valid", "methods"} <= record.keys()
    if owner == command or (owner is None and earlier):
        return
    by = f"was written by `puma-ray {owner}`" if owner else f"is not a report of `puma-ray {command}`"
    raise PumaError(f"{output}: exists and {by}; choose another output, or {OVERWRITE_HINT}")


def stamp(report: dict, command: str, config=None) -> dict:
    """``report`` with the marker of ``command`` under ``"written_by"`` (a one-file output)."""
    return {**report, "written_by": marker(command, config)}


# ---------------------------------------------------------------------------------------------
# Staged writes: nothing half-written is visible, and a failed run leaves the previous output whole

STAGING = ".staging"
PUBLISH = "publish.json"


def staged(out: str, *names: str) -> str:
    """Where a command writes what it will publish as ``out/name/...``: ``out/.staging/name/...``."""
    return storage.join(out, STAGING, *names)


def start_staging(out: str, keep: Iterable[str] = ()) -> None:
    """Before a command stages anything in ``out``: finish the publish an earlier run was cut off in
    (:func:`finish_publish`), then discard what an earlier failed run staged but the names in
    ``keep`` (a resumable stage keeps its finished parts and checks them itself)."""
    finish_publish(out)
    kept = tuple(staged(out, name) + "/" for name in keep)
    for uri in storage.list_files(staged(out)):
        if not uri.startswith(kept):
            storage.delete_file(uri)


def publish(out: str, names: list[str], retire: Iterable[str] = ()) -> None:
    """Make each staged ``out/.staging/<name>`` (a file or a directory) the output's ``out/<name>``.

    1. ``out/.staging/publish.json`` records every staged name's files: the commit point (from here
       on the publish is finished, by this run or by :func:`finish_publish` in the next one);
    2. the old output's records ``retire`` (its manifest, summary; files or directories) are deleted: until the caller
       writes the new ones the output is visibly incomplete, and readers refuse it
       (:func:`check_published`);
    3. per name, final files that are not staged are deleted and the staged ones moved over (a
       rename locally, copy + delete per object on S3);
    4. the staging directory is deleted, ``publish.json`` last.
    Names with nothing staged are left as they are. The caller writes its record last."""
    record: dict = {"retire": list(retire), "names": {}}
    for name in names:
        kind = _kind(staged(out, name))
        if kind == pafs.FileType.File:
            record["names"][name] = None
        elif kind == pafs.FileType.Directory:
            record["names"][name] = [u[len(staged(out, name)) + 1 :] for u in storage.list_files(staged(out, name))]
    storage.write_json(storage.join(staged(out), PUBLISH), record)
    finish_publish(out)


def finish_publish(out: str) -> bool:
    """Finish the publish recorded in ``out/.staging/publish.json`` (steps 2-4 of :func:`publish`;
    every step may be repeated). False when there is none."""
    record_uri = storage.join(staged(out), PUBLISH)
    record = read_record(record_uri)
    if not isinstance(record, dict):
        return False
    for name in record["retire"]:
        storage.delete_file(storage.join(out, name))
        storage.delete_dir(storage.join(out, name))
    for name, files in record["names"].items():
        src, dst = staged(out, name), storage.join(out, name)
        if files is None:
            if storage.exists(src):
                storage.move(src, dst)
            continue
        keep = set(files)
        for uri in storage.list_files(dst):
            if uri[len(dst) + 1 :] not in keep:
                storage.delete_file(uri)
        for f in files:
            if storage.exists(storage.join(src, f)):
                storage.move(storage.join(src, f), storage.join(dst, f))
    for uri in storage.list_files(staged(out)):
        if uri != record_uri:
            storage.delete_file(uri)
    storage.delete_dir(staged(out))
    return True


def final(out: str, uri: str) -> str:
    """The URI a staged ``uri`` of ``out`` will have once published (any other URI as it is)."""
    prefix = staged(out) + "/"
    return storage.join(out, uri[len(prefix) :]) if uri.startswith(prefix) else uri


def check_published(uri: str) -> None:
    """Refuse (one line) a store or data directory whose output is in the middle of a publish (a run
    cut off between its commit point and its last write)."""
    parent = uri.rstrip("/").rsplit("/", 1)[0]
    if storage.exists(storage.join(staged(parent), PUBLISH)):
        raise PumaError(
            f"{uri}: its output {parent} is being replaced (a run was cut off while publishing it); "
            "re-run the command that writes it to finish"
        )
