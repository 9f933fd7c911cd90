"""What the source model says about each user, for the selection strategies that ask it
(METHOD.md, "Group-based user selection"; puma_ray.select).

- :func:`source_losses`: each user's mean training loss under the source model (its LM, its head
  and the user's source prompt) over the user's training rows: the ``loss_*`` strategies.
- :func:`ffn_features`: the source LM's MLP outputs of its last ``layers`` decoder layers when it
  reads the user's prompt alone (inputs_embeds = the prompt's l vectors, no template), averaged
  over the l positions and concatenated: (layers * d,) per user: the ``ffn_*`` strategies.

Both are Ray Data passes with an actor pool (the LM loads once per actor); both need the source
run's head or LM, which :func:`check_source_model` finds (or refuses, in one line) before any work.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import ray
import torch
from ray.data import SaveMode

from puma_ray import console, storage
from puma_ray.config import NEEDS_LOSS, ScoringConfig, SelectConfig
from puma_ray.data import load_interactions, mean_by
from puma_ray.errors import PumaError
from puma_ray.llm import FrozenLM
from puma_ray.runtime import actor_device, actor_pool
from puma_ray.schema import decode_prompts, read_store_meta
from puma_ray.scorer import run_model, score_runs


def source_run(store_uri: str) -> str:
    """The run directory a prompt store lives in (``RUN/prompts`` -> ``RUN``: its head is there)."""
    return store_uri.rstrip("/").rsplit("/", 1)[0]


def check_source_model(cfg: SelectConfig, sources: list[str]) -> dict:
    """The source model config of a strategy that runs it (``cfg.source_model``, or the model the
    store records, fingerprint checked) -> dict. Raises PumaError (one line) for several sources,
    a loss strategy without a head beside the store, or a model that cannot be found or is not
    the store's."""
    if len(sources) != 1:
        raise PumaError(
            f"select.strategy {cfg.strategy!r} runs the source model, so it takes one source store, not {len(sources)}"
        )
    run = source_run(sources[0])
    if storage.join(run, "prompts") != sources[0].rstrip("/"):
        raise PumaError(
            f"select.strategy {cfg.strategy!r} runs the source model with its head: the source store {sources[0]} "
            "must be the prompts/ of a `prompts train` or `migrate` output directory"
        )
    if cfg.strategy in NEEDS_LOSS and not storage.exists(storage.join(run, "head.safetensors")):
        raise PumaError(
            f"select.strategy {cfg.strategy!r} scores users with the source head, but {run}/head.safetensors "
            "does not exist (a `prompts train` or `migrate` output directory holds prompts/ beside its head)"
        )
    return run_model(cfg.source_model, run)


def source_losses(store_uri: str, model: dict, train_uri: str, task: str, scoring: ScoringConfig) -> pa.Table:
    """(user_id string, loss float64): each user's mean per-row training loss (Head.row_loss) of the
    source run (``store_uri``'s run: LM ``model`` + head) over the rows of ``train_uri``."""
    run = source_run(store_uri)
    rows, n = load_interactions(train_uri, task)
    with console.Relay() as relay:
        scored = score_runs(
            {"source": {"uri": run, "model": model}}, task, rows, n, scoring, relay.handle, "select: source loss", True
        )
        means = mean_by(scored, ["user_id"], "loss").materialize()  # one row per user
    table = pa.concat_tables(ray.get(means.to_arrow_refs()))
    return table.cast(pa.schema([("user_id", pa.string()), ("loss", pa.float64())]))


class FfnFeatures:
    """map_batches callable: (user_id, prompt (l*d,)) -> (user_id, prompt (layers*d,)): the mean
    over the l positions of the MLP outputs of the LM's last ``layers`` decoder layers, the LM fed
    the prompt alone as inputs_embeds (B, l, d). Kept in a ``prompt`` column so the result is read
    like a prompt store (puma_ray.select.stream_clusters)."""

    def __init__(self, model: dict, task: str, prompt_length: int, layers: int, batch_size: int, num_gpus: float = 0):
        device = actor_device(num_gpus)
        self.lm = FrozenLM(
            model["path"],
            task,
            prompt_length=prompt_length,
            dtype=model["dtype"],
            attn_implementation=model["attn_implementation"],
            device=device,
            fast=False,
        )
        self.l, self.d, self.batch_size = prompt_length, self.lm.hidden_size, batch_size
        self.decoder = self.lm.model.get_decoder()
        blocks = list(self.decoder.layers)[-layers:]
        if not all(hasattr(b, "mlp") for b in blocks):
            raise PumaError(f"{model['path']}: decoder layers have no `mlp` module to read FFN activations from")
        self.outputs: list[torch.Tensor] = []
        for block in blocks:
            block.mlp.register_forward_hook(lambda _m, _i, out: self.outputs.append(out))
        self.width = len(blocks) * self.d

    @torch.no_grad()
    def __call__(self, batch: pa.Table) -> pa.Table:
        prompts = torch.from_numpy(decode_prompts(batch, self.l * self.d)).view(-1, self.l, self.d)
        feats = np.empty((len(prompts), self.width), np.float32)
        for s in range(0, len(prompts), self.batch_size):
            x = prompts[s : s + self.batch_size].to(self.lm.device, self.lm.model.dtype)
            self.outputs.clear()
            self.decoder(inputs_embeds=x, attention_mask=torch.ones(x.shape[:2], device=x.device), use_cache=False)
            feats[s : s + len(x)] = torch.cat([o.float().mean(1) for o in self.outputs], -1).cpu().numpy()
        flat = pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1)), self.width)
        return pa.table({"user_id": batch.column("user_id"), "prompt": flat})


def ffn_features(store_uri: str, model: dict, task: str, layers: int, scoring: ScoringConfig, out_uri: str) -> int:
    """Write every store user's FFN features (:class:`FfnFeatures`; ``layers``: at most the LM's
    layer count) to ``out_uri`` (Parquet: user_id, prompt fixed_size_list<float32>[layers*d]);
    returns their width."""
    meta = read_store_meta(store_uri)
    fs, path = storage.resolve(out_uri)
    storage.ray_read_parquet(store_uri, columns=["user_id", "prompt"]).map_batches(
        FfnFeatures,
        fn_constructor_kwargs={
            "model": model,
            "task": task,
            "prompt_length": meta.prompt_length,
            "layers": layers,
            "batch_size": scoring.batch_size,
            "num_gpus": scoring.num_gpus,
        },
        batch_size=4 * scoring.batch_size,
        batch_format="pyarrow",
        compute=actor_pool(scoring, "scoring"),
        num_gpus=scoring.num_gpus,
        num_cpus=scoring.cpus_per_actor,
    ).write_parquet(path, filesystem=fs, mode=SaveMode.OVERWRITE)
    return storage.read_schema(out_uri).field("prompt").type.list_size
