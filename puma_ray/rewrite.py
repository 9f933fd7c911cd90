"""The bulk rewrite: every source prompt -> adapter -> a target prompt store, plus a manifest.

The input is cut into *units* (consecutive row groups of one input file, ``min_rows_per_file``
to ``max_rows_per_file`` users), planned from Parquet footers only. Ray Data ``map_batches``
sends units to an actor pool (the adapter loads once per actor; ``rewrite.num_gpus`` each); an
actor streams its unit's rows through the adapter into ``prompts/part-<unit>-<k>.parquet`` and
then writes ``rewrite_state/unit-<unit>.json`` (rows, per-file sha256). Nothing is held whole.

Staged (puma_ray.outputs): units are written under ``OUT/.staging/prompts`` with their markers in
``OUT/.staging/rewrite_state``; only when every input user is there exactly once does
:func:`commit` publish them as ``OUT/prompts`` and write the manifest (input/output, row counts,
adapter fingerprint, files with checksums) LAST. No manifest = an incomplete store; a failed or
killed rewrite leaves the previous complete output as it was.

Resumable, exactly once: a re-run with the same output, input and adapter keeps every staged unit
that has its marker, deletes leftovers of unfinished units, and rewrites only those; a re-run of a
complete rewrite (same plan) does nothing.
"""

from __future__ import annotations

import hashlib
import json
import time

import pyarrow as pa
import pyarrow.compute as pc
import ray.data
import torch
from ray.data.expressions import col

from puma_ray import outputs, storage, templates
from puma_ray.adapter import load_adapter
from puma_ray.config import RewriteConfig, RewriteJobConfig
from puma_ray.console import Progress, say
from puma_ray.data import sum_by
from puma_ray.errors import PumaError, user_errors
from puma_ray.identity import model_info, store_meta
from puma_ray.runtime import actor_device, actor_pool, actor_pool_size, init_ray
from puma_ray.schema import StoreMeta, decode_prompts, prompt_store_schema, prompt_table
from puma_ray.sources import join_sources, source_metas


class Rewriter:
    """map_batches callable: (user_id, prompt (l*d_src)) rows -> (user_id, prompt (l*d_tgt)) rows."""

    def __init__(self, adapter_uri: str, meta: dict, threads: int = 1, num_gpus: float = 0):
        torch.set_num_threads(threads)
        self.device = actor_device(num_gpus)
        adapter, info = load_adapter(adapter_uri)
        self.adapter = adapter.to(self.device)
        self.meta = StoreMeta(**meta)
        self.l, self.d_in = info["prompt_length"], info["arch"]["d_in"]

    @torch.no_grad()
    def __call__(self, batch: pa.Table) -> pa.Table:
        x = torch.from_numpy(decode_prompts(batch, self.l * self.d_in, what="source prompt"))
        x = x.view(batch.num_rows, self.l, self.d_in)
        y = self.adapter(x.to(self.device)).reshape(batch.num_rows, -1).cpu().numpy()  # (B, l, d_src) -> (B, l*d_tgt)
        return prompt_table(self.meta, batch.column("user_id"), y)


def plan_units(source_uri: str, rcfg: RewriteConfig) -> list[dict]:
    """Cut the source store into units from footers only: [{"unit", "file", "row_groups", "rows", "size", "mtime"}]
    (size and mtime make a changed input a different plan, so a resume never mixes inputs)."""
    units = []
    for f in storage.parquet_files(source_uri):
        md = storage.parquet_file(f).metadata
        group, rows = [], 0
        for rg in range(md.num_row_groups):
            n = md.row_group(rg).num_rows
            if group and rows + n > rcfg.max_rows_per_file and rows >= rcfg.min_rows_per_file:
                units.append({"file": f, "row_groups": group, "rows": rows, **storage.stat(f)})
                group, rows = [], 0
            group.append(rg)
            rows += n
        if rows:
            units.append({"file": f, "row_groups": group, "rows": rows, **storage.stat(f)})
    return [{"unit": i, **u} for i, u in enumerate(units)]


class UnitRewriter:
    """map_batches callable over units: rewrites each unit's rows into its own output file(s),
    then writes the unit's marker. Input batch: unit, file, row_groups, rows -> one row per unit
    with the marker's JSON."""

    def __init__(self, adapter_uri: str, meta: dict, store_uri: str, state_uri: str, rcfg: dict):
        self.rcfg = RewriteConfig(**rcfg)
        self.rewriter = Rewriter(adapter_uri, meta, max(1, int(self.rcfg.cpus_per_actor)), self.rcfg.num_gpus)
        self.schema = prompt_store_schema(self.rewriter.meta)
        self.store_uri, self.state_uri = store_uri, state_uri

    def _write_unit(self, unit: int, file: str, row_groups: list[int], rows: int, **_) -> dict:
        t0 = time.time()
        src = storage.parquet_file(file)
        files, k, written, unit_ids = [], 0, 0, []
        batches = src.iter_batches(
            batch_size=self.rcfg.batch_size, row_groups=row_groups, columns=["user_id", "prompt"]
        )
        pending = None  # rows read but not yet written (a batch straddling a file boundary)
        while written < rows:
            uri = storage.join(self.store_uri, f"part-{unit:06d}-{k:03d}.parquet")
            digest, in_file = hashlib.sha256(), 0
            with storage.parquet_writer(uri, self.schema, digest) as w:
                while in_file < self.rcfg.max_rows_per_file:
                    if pending is None:
                        b = next(batches, None)
                        if b is None:
                            break
                        pending = self.rewriter(pa.Table.from_batches([b]))
                    take = min(pending.num_rows, self.rcfg.max_rows_per_file - in_file)
                    unit_ids.extend(pending.column("user_id").slice(0, take).chunks)
                    w.write_table(pending.slice(0, take))
                    pending = pending.slice(take) if take < pending.num_rows else None
                    in_file += take
            if in_file == 0:
                break
            files.append({"uri": uri, "rows": in_file, "sha256": digest.hexdigest()})
            written += in_file
            k += 1
        if written != rows:
            raise PumaError(f"{file}: row groups {row_groups} held {written} rows, the footer says {rows}")
        ids = pa.chunked_array(unit_ids, pa.string())  # one unit's ids only (<= its row groups' rows)
        mm = pc.min_max(ids).as_py()
        marker = {
            "unit": unit,
            "rows": written,
            "files": files,
            "id_min": mm["min"],
            "id_max": mm["max"],
            "unique": pc.count_distinct(ids).as_py() == written,
            "started": t0,  # epoch seconds: with "seconds", each unit's place on the rewrite's timeline
            "seconds": time.time() - t0,
            "actor": ray.get_runtime_context().get_actor_id(),
        }
        storage.write_json(storage.join(self.state_uri, f"unit-{unit:06d}.json"), marker)
        return marker

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = [self._write_unit(**u) for u in batch.to_pylist()]
        return pa.table(
            {"unit": [m["unit"] for m in out], "rows": [m["rows"] for m in out], "marker": [json.dumps(m) for m in out]}
        )


EAGER_FILES_PER_ACTOR = 4  # from this much work per actor on, the rewrite starts its whole pool at once


def actors_for(units: list[dict], rcfg: RewriteConfig) -> int:
    """The most actors the rewrite of ``units`` may start: one per unit, and unless ``rcfg.actors``
    is set, one per ``rcfg.min_rows_per_file`` users (a small store is done by one actor in well
    under a second, while starting another, a process importing torch, costs seconds)."""
    per_rows = -(-sum(u["rows"] for u in units) // rcfg.min_rows_per_file)
    return len(units) if rcfg.actors else max(1, min(len(units), per_rows))


def eager_pool(units: list[dict], rcfg: RewriteConfig, actors: int) -> bool:
    """Start all ``actors`` at once: every one has at least :data:`EAGER_FILES_PER_ACTOR` units and
    that many times ``rcfg.min_rows_per_file`` users to rewrite (at 500k users an autoscaling pool
    added its second actor seconds into a 19 s rewrite: benchmarks/RESULTS.md)."""
    rows = sum(u["rows"] for u in units)
    return (
        len(units) >= EAGER_FILES_PER_ACTOR * actors and rows >= EAGER_FILES_PER_ACTOR * actors * rcfg.min_rows_per_file
    )


def _start_or_resume(plan: dict, store_uri: str, state_uri: str, resume: bool) -> dict[int, dict]:
    """Markers of the units already done (empty when starting over); leftovers of others deleted."""
    plan_uri = storage.join(state_uri, "plan.json")
    if resume and storage.exists(plan_uri) and storage.read_json(plan_uri) == plan:
        done = {
            m["unit"]: m
            for m in (
                storage.read_json(u)
                for u in storage.list_files(state_uri, ".json")
                if u.rsplit("/", 1)[-1].startswith("unit-")
            )
        }
        keep = {f["uri"] for m in done.values() for f in m["files"]}
        for uri in storage.list_files(store_uri, ".parquet"):
            if uri not in keep:
                storage.delete_file(uri)
        return done
    storage.delete_dir(store_uri)
    storage.delete_dir(state_uri)
    storage.write_json(plan_uri, plan)
    return {}


def _busiest_actor_s(markers) -> float:
    """Seconds the busiest actor spent on its units (markers of this and earlier runs of the rewrite)."""
    busy: dict[str, float] = {}
    for m in markers:
        busy[m.get("actor", "")] = busy.get(m.get("actor", ""), 0.0) + m.get("seconds", 0.0)
    return max(busy.values(), default=0.0)


def _disjoint_unique(markers: list[dict]) -> bool:
    """Exactly-once proven from the markers alone: every unit's ids are distinct and the units'
    id ranges do not overlap (true for stores partitioned by id range; else the rows per user decide)."""
    ranges = sorted((m["id_min"], m["id_max"]) for m in markers if m["rows"])
    return all(m.get("unique", False) for m in markers) and all(a[1] < b[0] for a, b in zip(ranges, ranges[1:]))


def duplicates(store_uri: str) -> int:
    """Users appearing more than once in the store, from its rows per user (``data.sum_by``; nothing
    collected)."""
    counts = sum_by(storage.ray_read_parquet(store_uri, columns=["user_id"]), ["user_id"])
    return counts.filter(expr=col("n") > 1).count()


STAGED = ("prompts", "rewrite_state")  # what a resumed rewrite keeps of an earlier run's staging


def _complete(out_uri: str, plan_sha256: str) -> dict | None:
    """The manifest of a complete rewrite of the same plan at ``out_uri`` (every file still there), else None."""
    manifest = outputs.read_record(storage.join(out_uri, "manifest.json"))
    if not manifest or manifest.get("plan_sha256") != plan_sha256:
        return None
    present = set(storage.list_files(storage.join(out_uri, "prompts"), ".parquet"))
    return manifest if all(f["uri"] in present for f in manifest["output"]["files"]) else None


def rewrite_store(source_uri: str, adapter_uri: str, meta: StoreMeta, out_uri: str, rcfg: RewriteConfig) -> dict:
    """Rewrite every prompt of ``source_uri`` into the staged ``out_uri/.staging/prompts`` -> the
    manifest (URIs as published); :func:`commit` publishes the store and writes the manifest."""
    t0 = time.time()
    store_uri, state_uri = (outputs.staged(out_uri, p) for p in STAGED)
    adapter_info = storage.read_json(storage.join(adapter_uri, "adapter.json"))
    units = plan_units(source_uri, rcfg)
    n_in = sum(u["rows"] for u in units)
    plan = {"source": source_uri, "adapter": adapter_info["fingerprint"], "target": meta.__dict__, "units": units}
    plan_sha256 = outputs.config_hash(plan)
    previous = _complete(out_uri, plan_sha256) if rcfg.resume else None
    if previous is not None:
        storage.delete_dir(store_uri)  # another plan's leftovers must not be published with it
        storage.delete_dir(state_uri)
        say(f"rewrite: {out_uri} already holds this rewrite ({n_in:,} users); nothing to do")
        return previous
    done = _start_or_resume(plan, store_uri, state_uri, rcfg.resume)
    todo = [u for u in units if u["unit"] not in done]
    say(
        f"rewrite: {n_in:,} prompts in {len(units)} file(s) {source_uri} -> {store_uri}"
        + (f"; resuming, {len(done)} file(s) already done" if done else "")
    )
    if todo:
        args = {"adapter_uri": adapter_uri, "meta": meta.__dict__, "store_uri": store_uri, "state_uri": state_uri}
        actors = min(actors_for(todo, rcfg), actor_pool_size(rcfg, "rewrite"))
        results = ray.data.from_items(todo, override_num_blocks=len(todo)).map_batches(
            UnitRewriter,
            fn_constructor_kwargs={**args, "rcfg": rcfg.model_dump()},
            batch_size=1,
            batch_format="pyarrow",
            num_gpus=rcfg.num_gpus,
            num_cpus=rcfg.cpus_per_actor,
            compute=actor_pool(rcfg, "rewrite", limit=actors, eager=eager_pool(todo, rcfg, actors)),
        )
        progress = Progress("rewrite", sum(u["rows"] for u in todo), "users")
        for row in results.iter_rows():
            m = json.loads(row["marker"])
            done[m["unit"]] = m
            progress.add(m["rows"])
        progress.close()
    staged_files = [f for u in sorted(done) for f in done[u]["files"]]
    files = [{**f, "uri": outputs.final(out_uri, f["uri"])} for f in staged_files]
    n_out = sum(f["rows"] for f in files)
    proven = _disjoint_unique(list(done.values()))
    dup = duplicates(store_uri) if rcfg.verify and not proven else 0
    if len(done) != len(units) or n_out != n_in or dup:
        raise PumaError(f"{store_uri}: rewrite wrote {n_out} rows ({dup} users more than once) for {n_in} input users")
    manifest = {
        "input": {"uri": outputs.final(out_uri, source_uri), "rows": n_in},
        "output": {"uri": storage.join(out_uri, "prompts"), "rows": n_out, "files": files},
        "adapter": {"uri": outputs.final(out_uri, adapter_uri), "fingerprint": adapter_info["fingerprint"]},
        "target": meta.__dict__,
        "plan_sha256": plan_sha256,
        "verified_unique": proven or rcfg.verify,
        "unique_by": "disjoint unit id ranges" if proven else ("rows per user" if rcfg.verify else None),
        "wall_s": time.time() - t0,
        # the busiest actor's time reading, adapting and writing its units: the rewrite's own loop
        "loop_s": _busiest_actor_s(done.values()),
        # until this run's first unit started (planning, the actors' start-up): a fixed cost
        "startup_s": min((done[u["unit"]]["started"] - t0 for u in todo), default=0.0),
    }
    say(f"rewrite: {n_out:,} users exactly once in {len(files)} file(s), {manifest['wall_s']:.1f} s")
    return manifest


def commit(out_uri: str, manifest: dict | None, names: tuple[str, ...] = (), retire: tuple[str, ...] = ()) -> None:
    """Publish what is staged in ``out_uri`` (the rewritten store and ``names``), then write the
    manifest: the output's last write (puma_ray.outputs.publish). The old manifest and ``retire``
    are deleted first."""
    outputs.publish(out_uri, ["prompts", *names], retire=["manifest.json", *retire])
    if manifest is not None:
        storage.write_json(storage.join(out_uri, "manifest.json"), manifest)


COMMAND = "rewrite"


@user_errors
def rewrite(cfg: RewriteJobConfig) -> dict:
    """`puma-ray rewrite` entry: check the output and the pairing (sources, adapter, target model,
    template) before Ray starts and before anything is written, then rewrite (joining several sources
    first)."""
    inputs = {"sources": cfg.sources, "adapter": cfg.adapter, "model.path": outputs.local_model(cfg.model.path)}
    storage.set_s3_endpoint(cfg.storage.s3_endpoint)  # the check may read s3://
    outputs.check_output(cfg.output, COMMAND, inputs, cfg.output_mode == "overwrite")  # before Ray, before any delete
    # the pairing, before Ray starts and before the output is marked: footers, the adapter, model configs
    metas = source_metas(cfg.sources)
    fingerprint, _ = model_info(cfg.model.path)
    _, info = load_adapter(cfg.adapter, [m.model_fingerprint for m in metas], fingerprint)
    width = sum(m.hidden_size for m in metas)
    if info["arch"]["d_in"] != width:
        raise PumaError(f"{cfg.adapter}: adapter takes width {info['arch']['d_in']}, source store(s) have {width}")
    trained = info.get("template", templates.DEFAULT[cfg.task])  # adapters saved before templates were recorded
    template = cfg.template or trained
    templates.check_same(
        trained,
        info.get("template_hash", templates.spec_hash(trained)),
        cfg.adapter,
        templates.resolve(template, cfg.task),
        cfg.allow_template_change,
        "allow_template_change",
    )
    meta = store_meta(cfg.model.path, cfg.task, template, metas[0].prompt_length, "rewrite")
    init_ray(cfg.ray, cfg.storage)
    outputs.mark_output(cfg.output, COMMAND, cfg)
    outputs.start_staging(cfg.output, keep=STAGED if cfg.rewrite.resume else ())
    joined = join_sources(cfg.sources, outputs.staged(cfg.output, "source_joined"))
    manifest = rewrite_store(joined.uri, cfg.adapter, meta, cfg.output, cfg.rewrite)
    commit(cfg.output, manifest, ("source_joined",))
    return manifest
