"""Score prompt stores (+ model + head) and simple baselines on held-out interactions.

Streamed end to end: valid interactions are hash-joined (Ray Data) with a run's prompt store,
scored by ``map_batches`` with a callable class (the LM and head load once per actor), and reduced
to metrics without collecting rows: rating -> RMSE, MAE (error sums); ctr -> exact AUC (over a
distributed sort) and uAUC (mean per-user AUC over users with both classes; scikit-learn per user).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import ray.data
import torch
from sklearn.metrics import roc_auc_score

from puma_ray import console, storage
from puma_ray.config import EvaluateConfig
from puma_ray.data import load_interactions, shuffle_partitions
from puma_ray.errors import PumaError, user_errors
from puma_ray.heads import load_head
from puma_ray.llm import FrozenLM, model_info
from puma_ray.runtime import actor_device, actor_pool_size, init_ray
from puma_ray.schema import decode_prompts, read_store_meta


class PromptScorer:
    """map_batches callable over valid rows joined with their users' prompts:
    (user_id, label, item_text[, history_text], prompt (l*d)) -> (user_id, label, pred).

    Only the LM and the head live in the actor; prompts arrive in the rows. Rows scored are
    counted on the driver's console (``relay``: a console.Relay handle, under ``label``)."""

    def __init__(
        self,
        model: dict,
        task: str,
        run_uri: str,
        batch_size: int,
        num_gpus: float = 0,
        relay=None,
        label: str = "",
        total: int | None = None,
    ):
        meta = read_store_meta(storage.join(run_uri, "prompts"))
        self.device = actor_device(num_gpus)
        self.lm = FrozenLM(
            model["path"],
            task,
            meta.template,
            meta.prompt_length,
            model["dtype"],
            model["attn_implementation"],
            self.device,
        )
        self.head = load_head(run_uri, task, self.lm.fingerprint).to(self.device)
        self.l, self.d, self.batch_size = meta.prompt_length, meta.hidden_size, batch_size
        self.counter = console.RemoteProgress(relay, label, total, "rows", every=0.0)

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        p = decode_prompts(batch, self.l * self.d)
        prompts = torch.from_numpy(p).view(len(p), self.l, self.d).to(self.device)
        pred = np.empty(len(p), dtype=np.float32)
        hist = batch.get("history_text")
        for s in range(0, len(p), self.batch_size):
            rows = slice(s, s + self.batch_size)
            inputs = self.lm.collate(batch["item_text"][rows], hist[rows] if hist is not None else None)
            out = self.lm.forward(prompts[rows], inputs, want_hidden=self.head.wants_hidden)
            pred[rows] = self.head.predict(out).float().cpu().numpy()
        self.counter.add(len(p))
        return {"user_id": batch["user_id"], "label": batch["label"], "pred": pred}


def _sides(groups) -> list[str]:
    """Metric-name suffixes of the row selections: "" every row, "_in_<g>" / "_out_<g>" rows whose
    boolean column ``in_<g>`` is true / false."""
    return ["", *(f"_{side}_{g}" for g in groups for side in ("in", "out"))]


def _masks(batch, groups) -> dict[str, np.ndarray | None]:
    """One batch (pyarrow, pandas or numpy dict) -> {suffix of :func:`_sides`: row mask (None = every row)}."""
    out: dict = {"": None}
    for g in groups:
        flag = np.asarray(batch[f"in_{g}"], bool)
        out[f"_in_{g}"], out[f"_out_{g}"] = flag, ~flag
    return out


def _error_sums(batch: pa.Table, groups=()) -> pa.Table:
    """One row per batch: n, se, ae for every row selection of :func:`_masks` (column suffixes)."""
    err = np.asarray(batch.column("pred"), np.float64) - np.asarray(batch.column("label"), np.float64)
    cols = {}
    for side, m in _masks(batch, groups).items():
        e = err if m is None else err[m]
        cols.update({f"n{side}": [len(e)], f"se{side}": [float((e**2).sum())], f"ae{side}": [float(np.abs(e).sum())]})
    return pa.table(cols)


class SortedAUC:
    """Exact ROC AUC (ties count 1/2), fed batches in ascending pred order, one batch in memory:
    AUC = sum over positives of (negatives below + half the tied negatives) / (P * N)."""

    def __init__(self):
        self.negs_below = self.pairs = 0.0
        self.pos_total = self.neg_total = 0
        self.carry = None  # (value, positives, negatives) of the last tie group, which may continue in the next batch

    def add(self, pred, label) -> None:
        """pred (B,) ascending, continuing the previous batches; label (B,) 0/1."""
        pred, lab = np.asarray(pred, np.float64), np.asarray(label) > 0.5
        if len(pred) == 0:
            return
        vals, start = np.unique(pred, return_index=True)
        pos = np.add.reduceat(lab.astype(np.int64), start)
        neg = np.add.reduceat((~lab).astype(np.int64), start)
        if self.carry is not None and vals[0] == self.carry[0]:
            pos[0] += self.carry[1]
            neg[0] += self.carry[2]
        elif self.carry is not None:
            vals, pos, neg = np.r_[self.carry[0], vals], np.r_[self.carry[1], pos], np.r_[self.carry[2], neg]
        below = self.negs_below + np.cumsum(neg) - neg
        self.pairs += float((pos[:-1] * (below[:-1] + 0.5 * neg[:-1])).sum())
        self.negs_below = float(below[-1])
        self.pos_total += int(pos[:-1].sum())
        self.neg_total += int(neg[:-1].sum())
        self.carry = (vals[-1], int(pos[-1]), int(neg[-1]))

    def rows(self) -> int:
        return self.pos_total + self.neg_total + (self.carry[1] + self.carry[2] if self.carry else 0)

    def value(self) -> float:
        pairs, p, n = self.pairs, self.pos_total, self.neg_total
        if self.carry is not None:
            pairs += self.carry[1] * (self.negs_below + 0.5 * self.carry[2])
            p += self.carry[1]
            n += self.carry[2]
        return pairs / (p * n) if p and n else float("nan")


def sorted_auc(batches) -> float:
    """Exact ROC AUC of batches ({"pred", "label"}) sorted by pred ascending (see SortedAUC)."""
    auc = SortedAUC()
    for b in batches:
        auc.add(b["pred"], b["label"])
    return auc.value()


def _user_auc(group: pd.DataFrame, groups=()) -> pd.DataFrame:
    """One user's rows -> (auc_sum, users[, in_<g>]): their AUC and 1, or 0 and 0 when they have one
    class only; the user's subset flags are carried along."""

    y = group["label"].to_numpy() > 0.5
    both = 0 < y.sum() < len(y)
    return pd.DataFrame(
        {
            "auc_sum": [float(roc_auc_score(y, group["pred"].to_numpy())) if both else 0.0],
            "users": [int(both)],
            **{f"in_{g}": [bool(group[f"in_{g}"].iloc[0])] for g in groups},
        }
    )


def _uauc_sums(batch: pd.DataFrame, groups=()) -> pd.DataFrame:
    cols = {}
    for side, m in _masks(batch, groups).items():
        part = batch if m is None else batch[m]
        cols.update({f"auc_sum{side}": [float(part["auc_sum"].sum())], f"users{side}": [int(part["users"].sum())]})
    return pd.DataFrame(cols)


def dataset_metrics(task: str, ds, groups: tuple[str, ...] = ()) -> dict:
    """Metrics of a scored Ray Dataset (label, pred[, user_id][, in_<g>...]), streamed; for each
    group g also over the rows with in_<g> true (``<metric>_in_<g>``) and false (``_out_<g>``), in
    the same passes. rating -> RMSE, MAE from per-batch error sums; ctr -> exact AUC over one
    distributed sort, uAUC = mean per-user AUC (users with both classes) from one groupby.
    Nothing per row is collected; a selection without rows gets no metrics."""
    flags = [f"in_{g}" for g in groups]
    if task == "rating":
        sums = (
            ds.select_columns(["label", "pred", *flags])
            .map_batches(_error_sums, fn_kwargs={"groups": groups}, batch_format="pyarrow")
            .to_pandas()
            .sum()
        )
        if sums.get("n", 0) == 0:
            raise PumaError("no valid row could be scored (no user of the valid set has a prompt)")
        return {
            f"{k}{side}": v
            for side in _sides(groups)
            if sums[f"n{side}"] > 0
            for k, v in (
                ("rmse", math.sqrt(sums[f"se{side}"] / sums[f"n{side}"])),
                ("mae", float(sums[f"ae{side}"] / sums[f"n{side}"])),
            )
        }
    aucs: dict[str, SortedAUC] = {}
    for b in (
        ds.select_columns(["label", "pred", *flags]).sort("pred").iter_batches(batch_format="numpy", batch_size=65_536)
    ):
        for side, m in _masks(b, groups).items():
            aucs.setdefault(side, SortedAUC()).add(
                b["pred"] if m is None else b["pred"][m], b["label"] if m is None else b["label"][m]
            )
    rows = aucs[""].rows() if "" in aucs else 0
    per_user = (
        ds.select_columns(["user_id", "label", "pred", *flags])
        .groupby("user_id", num_partitions=shuffle_partitions(rows))
        .map_groups(_user_auc, fn_kwargs={"groups": groups}, batch_format="pandas")
    )
    sums = per_user.map_batches(_uauc_sums, fn_kwargs={"groups": groups}, batch_format="pandas").to_pandas().sum()
    out = {"uauc_users": int(sums.get("users", 0))}
    for side, auc in aucs.items():
        if auc.rows():
            n = int(sums.get(f"users{side}", 0))
            out.update({f"auc{side}": auc.value(), f"uauc{side}": sums[f"auc_sum{side}"] / n if n else float("nan")})
    if "auc" not in out:
        out.update(auc=float("nan"), uauc=float("nan"))
    return out


def _run_model(cfg: EvaluateConfig, run_uri: str) -> dict:
    """The model config to score a run with: cfg.model, or the model its prompt store records.

    Raises PumaError when the store was made for a model with another fingerprint."""
    store_uri = storage.join(run_uri, "prompts")
    meta = read_store_meta(store_uri)
    model = (
        cfg.model.model_dump() if cfg.model else {"path": meta.model, "dtype": "float32", "attn_implementation": "sdpa"}
    )
    fingerprint, _ = model_info(model["path"])
    if meta.model_fingerprint != fingerprint:
        raise PumaError(
            f"{store_uri}: prompt store was made for model {meta.model!r} (fingerprint {meta.model_fingerprint}); "
            f"model {model['path']!r} has fingerprint {fingerprint}"
        )
    return model


def _distinct_users(ds, rows: int) -> int:
    return ds.select_columns(["user_id"]).groupby("user_id", num_partitions=shuffle_partitions(rows)).count().count()


def _with_subsets(ds, subsets: dict[str, pa.Array]):
    """Adds a boolean column ``in_<name>`` per subset (small user lists, e.g. the adapter's users)."""
    if not subsets:
        return ds

    def flag(batch: pa.Table) -> pa.Table:
        for name, users in subsets.items():
            batch = batch.append_column(
                f"in_{name}", pc.is_in(batch.column("user_id").cast(pa.string()), value_set=users)
            )
        return batch

    return ds.map_batches(flag, batch_format="pyarrow")


def _report_metrics(task: str, scored, subsets: dict[str, pa.Array]) -> dict:
    """Whole-set metrics plus, per subset, the same metrics inside and outside it (one set of passes)."""
    return dataset_metrics(task, _with_subsets(scored, subsets).materialize(), tuple(subsets))


def _global_mean(train_ds, train_rows: int, valid_ds, valid_rows: int, g: float):
    """global_mean baseline rows: every valid row predicted by the mean train label ``g``."""

    def fill(batch: pa.Table) -> pa.Table:
        return batch.append_column("pred", pa.array(np.full(batch.num_rows, g)))

    return valid_ds.select_columns(["user_id", "label"]).map_batches(fill, batch_format="pyarrow")


def _user_mean(train_ds, train_rows: int, valid_ds, valid_rows: int, g: float):
    """user_mean baseline rows: each valid row predicted by its user's mean train label (``g`` for unseen users)."""
    means = train_ds.groupby("user_id", num_partitions=shuffle_partitions(train_rows)).mean("label")
    means = means.rename_columns({"mean(label)": "user_mean"})
    joined = valid_ds.select_columns(["user_id", "label"]).join(
        means, join_type="left_outer", num_partitions=shuffle_partitions(valid_rows), on=("user_id",)
    )

    def fill(batch: pa.Table) -> pa.Table:
        pred = pc.fill_null(batch.column("user_mean").cast(pa.float64()), g)
        return pa.table({"user_id": batch.column("user_id"), "label": batch.column("label"), "pred": pred})

    return joined.map_batches(fill, batch_format="pyarrow")


BASELINES = {"global_mean": _global_mean, "user_mean": _user_mean}  # name -> scored valid rows (no LM)


def _score_run(cfg: EvaluateConfig, name: str, run_uri: str, model: dict, valid_ds, valid_rows: int, relay):
    """Valid rows of the users with a prompt in ``run_uri`` joined with their prompts and scored
    by an actor pool (LM + head per actor; rows counted on the console through ``relay``, a
    console.Relay handle) -> materialized (user_id, label, pred) rows."""
    sc = cfg.scoring
    pool = actor_pool_size(sc, "scoring")
    prompts = storage.ray_read_parquet(storage.join(run_uri, "prompts"), columns=["user_id", "prompt"])
    partitions = shuffle_partitions(valid_rows, at_least=pool)  # one block per actor at least
    joined = valid_ds.join(prompts, join_type="inner", num_partitions=partitions, on=("user_id",))
    scorer_args = {
        "model": model,
        "task": cfg.task,
        "run_uri": run_uri,
        "batch_size": sc.batch_size,
        "num_gpus": sc.num_gpus,
        "relay": relay,
        "label": f"evaluate: scoring {name}",
        "total": valid_rows,
    }
    return joined.map_batches(
        PromptScorer,
        fn_constructor_kwargs=scorer_args,
        batch_size=4 * sc.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=pool),
        num_gpus=sc.num_gpus,
        num_cpus=sc.cpus_per_actor,
    ).materialize()


@user_errors
def evaluate(cfg: EvaluateConfig) -> dict:
    """Entry: score every run in ``cfg.runs`` and the baselines on ``cfg.data.valid``; print a table.

    Valid rows are joined (Ray Data hash join) with each run's prompt store and scored by an actor
    pool holding only the LM and head; rows of users without a prompt are counted, not scored."""
    init_ray(cfg.ray, cfg.storage)
    if not cfg.data.valid:
        raise PumaError("evaluate needs data.valid (the held-out interactions)")
    valid_ds, valid_rows = load_interactions(cfg.data.valid, cfg.task)
    models = {name: _run_model(cfg, uri) for name, uri in cfg.runs.items()}  # mismatches refused before any work
    subsets = {
        name: storage.read_table(uri, columns=["user_id"]).column("user_id").combine_chunks().cast(pa.string())
        for name, uri in cfg.subsets.items()
    }
    valid_users = _distinct_users(valid_ds, valid_rows)
    names = [*cfg.runs, *cfg.baselines]
    console.say(
        f"evaluate: {len(names)} method(s) ({', '.join(names)}) on {valid_rows:,} valid rows of {valid_users:,} users"
    )
    results = {}
    with console.Relay() as relay:
        for name, run_uri in cfg.runs.items():
            summary_uri = storage.join(run_uri, "summary.json")
            summary = storage.read_json(summary_uri) if storage.exists(summary_uri) else {}
            scored = _score_run(cfg, name, run_uri, models[name], valid_ds, valid_rows, relay.handle)
            rows = scored.count()
            if rows == 0:
                raise PumaError(f"{run_uri}: no valid row could be scored (no user of {cfg.data.valid} has a prompt)")
            results[name] = {
                **_report_metrics(cfg.task, scored, subsets),
                "scored_rows": rows,
                "unknown_rows": valid_rows - rows,
                "unknown_users": valid_users - _distinct_users(scored, rows),
                "lm_sample_passes": summary.get("lm_sample_passes", 0),
                "wall_s": summary.get("wall_s", 0.0),
            }
    if cfg.baselines:
        train_ds, train_rows = load_interactions(cfg.data.train, cfg.task)
        g = float(train_ds.mean("label"))
        for name in cfg.baselines:
            scored = BASELINES[name](train_ds, train_rows, valid_ds, valid_rows, g)
            results[name] = {
                **_report_metrics(cfg.task, scored, subsets),
                "scored_rows": valid_rows,
                "unknown_rows": 0,
                "unknown_users": 0,
                "lm_sample_passes": 0,
                "wall_s": 0.0,
            }
    report = {"task": cfg.task, "valid": cfg.data.valid, "methods": results}
    print(format_table(report))
    if cfg.output:
        storage.write_json(cfg.output, report)
    return report


def format_table(report: dict) -> str:
    """A Markdown table of a report (methods x metrics + cost); subset columns when present."""
    task = report["task"]
    cols = ["rmse", "mae"] if task == "rating" else ["auc", "uauc"]
    methods = report["methods"]
    subs = sorted({k[len(cols[0]) + 4 :] for m in methods.values() for k in m if k.startswith(f"{cols[0]}_in_")})
    extra = [f"{cols[0]}_{side}_{sub}" for sub in subs for side in ("in", "out")]
    head = [c.upper() for c in cols] + [f"{cols[0].upper()} {side} {sub}" for sub in subs for side in ("in", "out")]
    lines = [
        f"| method | {' | '.join(head)} | LM sample-passes | wall s | unknown rows |",
        "|---|" + "---:|" * (len(head) + 3),
    ]
    for name, m in methods.items():
        vals = " | ".join(f"{m[c]:.4f}" if c in m else "" for c in cols + extra)
        cost = f"{int(m.get('lm_sample_passes', 0)):,} | {m.get('wall_s', 0):.1f} | {m.get('unknown_rows', 0)}"
        lines.append(f"| {name} | {vals} | {cost} |")
    return "\n".join(lines)
