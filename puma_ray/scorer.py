"""The one scoring pass of prompt stores: interaction rows joined with the prompts of every run and
scored by an actor pool that loads each LM and head once (``evaluate``, the selection signals and
cold start all score through :func:`score_runs`).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from puma_ray import console, storage
from puma_ray.config import ModelConfig, ScoringConfig
from puma_ray.data import compact, join_on, with_held
from puma_ray.errors import PumaError
from puma_ray.heads import load_head
from puma_ray.identity import model_info
from puma_ray.llm import FrozenLM, row_texts
from puma_ray.metrics import tag_run
from puma_ray.runtime import actor_device, actor_pool, actor_pool_size
from puma_ray.schema import decode_prompts, read_store_meta


class PromptScorer:
    """map_batches callable over valid rows joined with their users' prompts of every run:
    (run, user_id, label, item_text[, history_text], prompt) -> (run, user_id, label, pred[, loss]).

    ``runs``: name -> {"uri": the run, "model": its model config[, "prompts": a store to use
    instead of the run's prompts/ (scored with the run's head)]}. The actor loads each LM once
    (runs made for the same model share it) and each run's head; prompts arrive in the rows.
    Rows scored are counted on the driver's console (``relay``: a console.Relay handle, under
    ``label``)."""

    def __init__(
        self,
        runs: dict[str, dict],
        task: str,
        batch_size: int,
        num_gpus: float = 0,
        relay=None,
        label: str = "",
        total: int | None = None,
        loss: bool = False,
    ):
        self.device = actor_device(num_gpus)
        self.loss = loss
        self.batch_size = batch_size
        self.runs: dict[str, tuple] = {}
        lms: dict[tuple, FrozenLM] = {}
        for name, run in runs.items():
            meta = read_store_meta(run_store(run))
            m = run["model"]
            key = (m["path"], m["dtype"], m["attn_implementation"], meta.template, meta.prompt_length)
            if key not in lms:
                lms[key] = FrozenLM(
                    m["path"],
                    task,
                    meta.template,
                    meta.prompt_length,
                    m["dtype"],
                    m["attn_implementation"],
                    self.device,
                    prefix_cache_mb=m["prefix_cache_mb"],
                )
            head = load_head(run["uri"], task, lms[key].fingerprint).to(self.device)
            self.runs[name] = (lms[key], head, meta.prompt_length, meta.hidden_size, run_store(run))
        self.counter = console.RemoteProgress(relay, label, total, "rows", every=0.0)

    @torch.no_grad()
    def __call__(self, batch: pa.Table) -> pa.Table:
        pred = np.empty(batch.num_rows, dtype=np.float32)
        loss = np.empty(batch.num_rows, dtype=np.float32)
        run = batch.column("run").to_numpy(zero_copy_only=False)
        for name in np.unique(run):
            lm, head, l, d, store = self.runs[name]
            where = np.flatnonzero(run == name)
            rows = batch.take(pa.array(where))
            prompts = torch.from_numpy(decode_prompts(rows, l * d, where=store)).view(len(where), l, d).to(self.device)
            items, history = row_texts(rows)
            labels = torch.from_numpy(rows.column("label").to_numpy()).float().to(self.device) if self.loss else None
            for s in range(0, len(where), self.batch_size):
                part = slice(s, s + self.batch_size)
                inputs = lm.collate(items[part], history[part] if history is not None else None)
                out = lm.forward(prompts[part], inputs, want_hidden=head.wants_hidden)
                if self.loss:
                    row_loss, p = head.row_loss(out, labels[part])
                    loss[where[part]] = row_loss.float().cpu().numpy()
                else:
                    p = head.predict(out)
                pred[where[part]] = p.float().cpu().numpy()
        self.counter.add(batch.num_rows)
        cols = {"run": batch["run"], "user_id": batch["user_id"], "label": batch["label"], "pred": pred}
        return with_held(batch, {**cols, "loss": loss} if self.loss else cols)


def run_store(run: dict) -> str:
    """The prompt store a scored run reads: its "prompts" entry, else the run directory's prompts/."""
    return run.get("prompts") or storage.join(run["uri"], "prompts")


def run_model(model: ModelConfig | None, run_uri: str) -> dict:
    """The model config (a dict) to score a run with: ``model``, or the model its prompt store records.

    Raises PumaError when the store was made for a model with another fingerprint."""
    store_uri = storage.join(run_uri, "prompts")
    meta = read_store_meta(store_uri)
    model = (model or ModelConfig(path=meta.model)).model_dump()
    fingerprint, _ = model_info(model["path"])
    if meta.model_fingerprint != fingerprint:
        raise PumaError(
            f"{store_uri}: prompt store was made for model {meta.model!r} (fingerprint {meta.model_fingerprint}); "
            f"model {model['path']!r} has fingerprint {fingerprint}"
        )
    return model


def score_runs(
    runs: dict[str, dict],
    task: str,
    rows_ds,
    rows_count: int,
    sc: ScoringConfig,
    relay,
    label: str,
    loss: bool = False,
):
    """Interaction rows joined with the prompts of every run (``runs``: as :class:`PromptScorer`
    takes them) and scored in one pass by an actor pool (the runs' LMs
    + heads per actor; rows counted on the console through ``relay``, a console.Relay handle,
    under ``label``) -> materialized (run, user_id, label, pred[, loss]) in few blocks
    (``data.compact``: the passes after it are cheap per row); ``loss``: add each row's training
    loss (Head.row_loss)."""
    stores = [
        storage.ray_read_parquet(run_store(run), columns=["user_id", "prompt"]).map_batches(
            tag_run, fn_kwargs={"run": name}, batch_format="pyarrow"
        )
        for name, run in runs.items()
    ]
    prompts = stores[0].union(*stores[1:]) if len(stores) > 1 else stores[0]
    total = rows_count * len(stores)
    side_bytes = sum(
        storage.parquet_rows(run_store(run)) * read_store_meta(run_store(run)).width * 4 for run in runs.values()
    )
    joined = join_on(rows_ds, prompts, "user_id", total, side_bytes, at_least=actor_pool_size(sc, "scoring"))
    scorer_args = {
        "runs": runs,
        "task": task,
        "batch_size": sc.batch_size,
        "num_gpus": sc.num_gpus,
        "relay": relay,
        "label": label,
        "total": total,
        "loss": loss,
    }
    scored = joined.map_batches(
        PromptScorer,
        fn_constructor_kwargs=scorer_args,
        batch_size=4 * sc.batch_size,
        batch_format="pyarrow",
        compute=actor_pool(sc, "scoring"),
        num_gpus=sc.num_gpus,
        num_cpus=sc.cpus_per_actor,
    ).materialize()
    return compact(scored)
