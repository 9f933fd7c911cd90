"""The user-selection stage (`migrate`'s select step): it streams the source store and runs one of
the strategies of puma_ray.strategies on it.

:func:`select_users` (the stage entry) reads user ids and the profile (no prompt), reads only the
K-means sample's prompts, and assigns clusters with Ray Data ``map_batches`` over the store
(``selection/clusters/``). It writes ``selected.parquet`` (user_id string, cluster int32; -1 = no
cluster) and ``selection.json``.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from ray.data import SaveMode

from puma_ray import storage
from puma_ray.config import NEEDS_LOSS, NEEDS_SOURCE_MODEL, ScoringConfig, SelectConfig, check_budget
from puma_ray.console import say
from puma_ray.errors import PumaError, user_errors
from puma_ray.schema import decode_prompts, read_store_meta, store_user_ids
from puma_ray.strategies import (
    STRATEGIES,
    Candidates,
    Space,
    fit_projection,
    fit_space,
    kmeans_sample,
    summary_stats,
)

NO_CLUSTER = -1

SELECTED_SCHEMA = pa.schema(
    [pa.field("user_id", pa.string(), nullable=False), pa.field("cluster", pa.int32(), nullable=False)]
)


def read_sample(uri: str, width: int, ids: pa.Array, positions: np.ndarray) -> np.ndarray:
    """The prompts (S, width) of the users at ``positions`` of ``ids`` (sorted ids), in user_id
    order, reading only their rows of the store at ``uri``."""
    sample = storage.read_table(uri, filters=pc.field("user_id").isin(ids.take(pa.array(positions))))
    return decode_prompts(sample.sort_by("user_id"), width, where=uri)


# ---------------------------------------------------------------------------------------------
# Stage


def resolve_budget(budget: int | float, n_users: int, uri: str) -> int:
    """``budget`` an int >= 1: that many users; a float in (0, 1]: that fraction of ``n_users`` (rounded,
    at least 1; 1.0 is every user). Anything else (1.5, 2.0, 0) is refused (``config.check_budget``),
    and so is a count above ``n_users`` (``uri`` names the input); one-line PumaErrors."""
    try:
        budget = check_budget(budget)
    except ValueError as exc:
        raise PumaError(f"select: {exc}") from None
    count = budget if isinstance(budget, int) else max(1, int(round(budget * n_users)))
    if count > n_users:
        raise PumaError(f"{uri}: budget {count} exceeds the {n_users} users with interactions")
    return count


def _assign(batch: pa.Table, model, proj, width: int, uri: str) -> pa.Table:
    """map_batches: (user_id, prompt) rows -> (user_id, cluster int32[, coords]), prompts validated."""
    x = decode_prompts(batch, width, where=uri) if batch.num_rows else np.zeros((0, width), np.float32)
    cols = {"user_id": batch.column("user_id"), "cluster": pa.array(model.predict(x).astype(np.int32), pa.int32())}
    if proj is not None:
        z = proj.transform(x).astype(np.float32)
        cols["coords"] = pa.FixedSizeListArray.from_arrays(pa.array(z.reshape(-1)), proj.n_components_)
    return pa.table(cols)


def stream_clusters(
    uri: str,
    width: int,
    ids: pa.Array,
    cfg: SelectConfig,
    rng: np.random.Generator,
    out_uri: str,
    space: Space = "prompt",
    coords: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """K-means over a prompt store (or a table of FFN features shaped like one: user_id, prompt
    (width,)) without holding it: fit on the rows of a random sample of ``ids`` (sorted candidate
    ids, (N,)), assign every user with Ray Data map_batches into ``out_uri`` (user_id, cluster[,
    coords]). Returns (N,) int64 clusters aligned with ``ids`` and, when ``coords``, their
    (N, fps_dims) float32 PCA projection."""
    x = read_sample(uri, width, ids, kmeans_sample(len(ids), cfg, rng))
    model = fit_space(x, cfg, space)
    proj = fit_projection(x, cfg) if coords else None
    fs, path = storage.resolve(out_uri)
    storage.ray_read_parquet(uri, columns=["user_id", "prompt"]).map_batches(
        _assign,
        fn_kwargs={"model": model, "proj": proj, "width": width, "uri": uri},
        batch_format="pyarrow",
    ).write_parquet(path, filesystem=fs, mode=SaveMode.OVERWRITE)
    assigned = storage.read_table(out_uri)
    keys = pa.table({"user_id": assigned.column("user_id").cast(pa.string()), "row": np.arange(assigned.num_rows)})
    rows = pa.table({"user_id": ids}).join(keys, "user_id", join_type="inner").sort_by("user_id")
    assigned = assigned.take(rows.column("row"))  # (a join cannot carry the fixed-size coords column)
    cluster = assigned.column("cluster").to_numpy().astype(np.int64)
    if not coords:
        return cluster, None
    z = decode_prompts(assigned, proj.n_components_, where=out_uri, what="coordinate", column="coords")
    return cluster, z


@user_errors
def select_users(
    cfg: SelectConfig,
    source_store_uri: str,
    profile_uri: str,
    out_uri: str,
    train_uri: str | None = None,
    task: str = "rating",
    scoring: ScoringConfig | None = None,
) -> dict:
    """Entry: choose ``cfg.budget`` users of the prompt store that have interactions in the profile.

    Writes ``out_uri/selected.parquet`` (user_id, cluster; sorted by user_id),
    ``out_uri/selection.json`` (the returned summary) and, for K-means strategies,
    ``out_uri/clusters/`` (every store user's cluster). Store users without interactions and
    profile users without a prompt are counted in the summary and noted on stderr. The ``loss``
    strategies score ``train_uri`` (the source's training rows, ``task``) with the source run; the
    ``ffn`` ones run its LM over the store (``out_uri/ffn_features/``); both with ``scoring``'s
    actor pool.
    """
    fn = STRATEGIES[cfg.strategy]  # the config accepts only registered names
    signals, source_model = None, None
    if cfg.strategy in NEEDS_SOURCE_MODEL:
        from puma_ray import signals  # noqa: PLC0415 (torch and an LM: for these strategies only)

        source_model = signals.check_source_model(cfg, [source_store_uri])
        if cfg.strategy in NEEDS_LOSS and train_uri is None:
            raise PumaError(f"select.strategy {cfg.strategy!r} needs the source's training interactions (data.train)")
    scoring = scoring or ScoringConfig()
    store_ids = store_user_ids(source_store_uri)  # nulls and duplicates refused
    profile = storage.read_table(profile_uri)
    missing = [c for c in ("user_id", "label_var") if c not in profile.column_names]
    if missing:
        raise PumaError(f"{profile_uri}: not a user profile (lacks columns {missing})")
    profile = profile.select(["user_id", "label_var"]).cast(
        pa.schema([("user_id", pa.string()), ("label_var", pa.float64())])
    )
    # Candidates in user_id order, so the result does not depend on the store's row order.
    cand = pa.table({"user_id": store_ids}).join(profile, "user_id", join_type="inner").sort_by("user_id")
    no_interactions, no_prompt = len(store_ids) - cand.num_rows, profile.num_rows - cand.num_rows
    if no_interactions or no_prompt:
        say(
            f"select: skipping {no_interactions} store user(s) with no interactions and "
            f"{no_prompt} profile user(s) with no prompt"
        )
    if cand.num_rows == 0:
        raise PumaError(f"{source_store_uri}: no user of the prompt store has interactions in {profile_uri}")
    ids = cand.column("user_id").combine_chunks()
    var = cand.column("label_var").to_numpy()
    budget = resolve_budget(cfg.budget, len(ids), source_store_uri)
    say(f"select: {cfg.strategy}, {budget:,} of {len(ids):,} users")

    width = read_store_meta(source_store_uri).width
    clusters_uri = storage.join(out_uri, "clusters")

    def clusters(c: SelectConfig, rng: np.random.Generator, space: Space, coords: bool):
        uri, w = source_store_uri, width
        if space == "ffn":
            uri = storage.join(out_uri, "ffn_features")
            say(f"select: FFN activations of {source_model['path']} for every user")
            w = signals.ffn_features(source_store_uri, source_model, task, c.ffn_layers, scoring, uri)
        return stream_clusters(uri, w, ids, c, rng, clusters_uri, space, coords)

    def loss() -> np.ndarray:
        say(f"select: source loss of every candidate on {train_uri}")
        table = signals.source_losses(source_store_uri, source_model, train_uri, task, scoring)
        aligned = pa.table({"user_id": ids}).join(table, "user_id", join_type="left outer").sort_by("user_id")
        return aligned.column("loss").fill_null(np.nan).to_numpy()

    picked, extra = fn(Candidates(var, clusters, loss), budget, cfg, np.random.default_rng(cfg.seed))
    picked = np.asarray(picked, np.int64)
    if len(picked) != budget or len(np.unique(picked)) != budget:
        raise RuntimeError(
            f"strategy {cfg.strategy!r} returned {len(np.unique(picked))} unique of {len(picked)} users, "
            f"expected {budget}"
        )
    cluster = np.asarray(extra.pop("cluster", np.full(budget, NO_CLUSTER)), np.int32)

    order = np.argsort(picked, kind="stable")  # positions in sorted ids -> selection sorted by user_id
    table = pa.Table.from_arrays([ids.take(pa.array(picked[order])), pa.array(cluster[order])], schema=SELECTED_SCHEMA)
    storage.write_table(storage.join(out_uri, "selected.parquet"), table)

    summary = {
        "strategy": cfg.strategy,
        "budget": budget,
        "budget_requested": cfg.budget,
        "candidates": len(ids),
        "skipped_no_interactions": no_interactions,
        "skipped_no_prompt": no_prompt,
        "selected": budget,
        "seed": cfg.seed,
        "variance": {"all": summary_stats(var), "selected": summary_stats(var[picked])},
        **extra,
    }
    storage.write_json(storage.join(out_uri, "selection.json"), summary)
    return summary


def read_selected(out_uri: str) -> pa.Array:
    """The selected user ids (string, sorted) of a :func:`select_users` output directory."""
    path = storage.join(out_uri, "selected.parquet")
    return storage.read_table(path, columns=["user_id"]).column("user_id").combine_chunks()
