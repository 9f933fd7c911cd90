"""Shared fixtures: one Ray session, tiny models of every family, small synthetic data sets, and a
real S3 endpoint (moto's server mode over HTTP on loopback); shared helpers: :func:`random_store`
(a random prompt store) and :func:`users_of` (a data set's training users).

Test tiers (the markers registered in pyproject.toml): each test gets one, the heaviest thing it
needs, from the fixtures it uses (:func:`pytest_collection_modifyitems`): ``cluster`` (a multi-node
Ray cluster of cluster/local.sh), ``real`` (the real pretrained checkpoints), ``ray`` (a Ray
session), else ``fast``. A test that starts Ray another way (a subprocess, a fixture asked for at
run time) is marked by hand; a ``fast`` test that calls ``ray.init`` fails and says so.
``pytest -m fast`` is the inner loop; plain ``pytest`` (CI) runs every tier.

Also: a deprecation warning is charged to the code that called the deprecated API
(:func:`warn_charging_the_caller`), so pyproject.toml's filters fail a test when puma_ray's own call
uses an API its dependencies deprecate."""

from __future__ import annotations

import os
import socket
import sys
import uuid
import warnings

import boto3
import numpy as np
import pytest
import ray
from moto.server import ThreadedMotoServer

from puma_ray import config as C
from puma_ray import storage
from puma_ray.config import RayConfig
from puma_ray.datasets.synthetic import synthesize
from puma_ray.identity import store_meta
from puma_ray.models import build_tiny
from puma_ray.runtime import init_ray
from puma_ray.schema import prompt_store_schema, prompt_table
from puma_ray.stage1 import train_prompts

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # before any tokenizer runs (Ray forks workers)

# Modules a call passes through between its caller and the called library's own code: torch's module
# call (a model's forward), functools' and contextlib's wrappers, torch's no_grad decorator.
PASS_THROUGH = {"functools", "contextlib", "torch.nn.modules.module", "torch.utils._contextlib"}
_warn = warnings.warn


def _package(frame) -> str:
    return frame.f_globals.get("__name__", "").partition(".")[0]


def warn_charging_the_caller(message, category=None, stacklevel=1, source=None, **kwargs):
    """``warnings.warn``, but a DeprecationWarning or FutureWarning that its library charges to a
    caller (``stacklevel`` >= 2) is charged to the first frame, from the one ``stacklevel`` names
    outwards, that is neither the library's own code nor a :data:`PASS_THROUGH` module: the code
    that called the deprecated API. A library's ``stacklevel`` stops short of it when the call goes
    through torch's ``Module.__call__`` or the library's decorators (transformers' ``deprecate_kwarg``
    on a model's forward names torch's module call). pyproject.toml's filters match that frame's
    module, e.g. ``puma_ray.llm``. A warning about the library's own code (``stacklevel`` 1, e.g. Ray
    Data's DataContext setting its own deprecated field) stays the library's."""
    if category is None:
        category = type(message) if isinstance(message, Warning) else UserWarning
    if kwargs or stacklevel < 2 or not issubclass(category, (DeprecationWarning, FutureWarning)):
        return _warn(message, category, stacklevel + 1, source, **kwargs)
    issuer = sys._getframe(1)
    frame = issuer
    for _ in range(stacklevel - 1):
        frame = frame.f_back or frame
    library = _package(issuer)
    while frame.f_back is not None and (_package(frame) == library or frame.f_globals.get("__name__") in PASS_THROUGH):
        frame = frame.f_back
    module_globals = frame.f_globals
    warnings.warn_explicit(
        message,
        category,
        frame.f_code.co_filename,
        frame.f_lineno,
        module=module_globals.get("__name__", "<string>"),
        registry=module_globals.setdefault("__warningregistry__", {}),
        module_globals=module_globals,
        source=source,
    )


warnings.warn = warn_charging_the_caller

# The tiers, heaviest first, and the fixtures that put a test in each (``fast``: none of them).
TIERS = ("cluster", "real", "ray", "fast")
TIER_FIXTURES = {
    "cluster": {"local_cluster"},  # tests/test_cluster_job.py: a head and a worker node of cluster/local.sh
    "real": {"real"},  # tests/test_real_models.py: the packaged GGUFs fetched and imported
    "ray": {"ray_session"},  # the suite's Ray, directly or through a fixture on it (stage1_run, ...)
}


def fixture_tier(item: pytest.Item) -> str:
    """The tier the fixtures of ``item`` (their own fixtures included) put it in."""
    used = set(getattr(item, "fixturenames", ()))
    return next((tier for tier, names in TIER_FIXTURES.items() if used & names), "fast")


@pytest.hookimpl(tryfirst=True)  # before ``-m`` selects by the markers
def pytest_collection_modifyitems(config, items) -> None:
    """Marks each test with its tier: the one marked by hand (for what its fixtures do not show),
    else :func:`fixture_tier`. A hand-marked tier lighter than the fixtures' is an error, as are two."""
    for item in items:
        marked = [tier for tier in TIERS if item.get_closest_marker(tier)]
        tier = fixture_tier(item)
        if len(marked) > 1 or (marked and TIERS.index(marked[0]) > TIERS.index(tier)):
            raise pytest.UsageError(f"{item.nodeid}: marked {marked}, but its fixtures make it {tier!r}")
        if not marked:
            item.add_marker(tier)


@pytest.fixture(autouse=True)
def fast_tests_start_no_ray(request, monkeypatch) -> None:
    """A ``fast`` test that starts Ray (``ray.init``: puma_ray's init_ray, Ray Data's auto-init)
    fails: it belongs in the ``ray`` tier."""
    if request.node.get_closest_marker("fast") is None:
        return

    def refuse(*_, **__):
        """``ray.init`` for a fast test."""
        raise AssertionError(f"{request.node.nodeid} starts Ray: mark it `ray` (tiers: tests/conftest.py)")

    monkeypatch.setattr(ray, "init", refuse)


def users_of(data_dir: str) -> list[str]:
    """The users of ``data_dir``/train (local or s3://), sorted."""
    ids = storage.read_table(f"{data_dir}/train", columns=["user_id"]).column("user_id").to_pylist()
    return sorted(set(ids))


def random_store(
    uri: str,
    model_path: str,
    users: list[str] | int,
    *,
    prompt_length: int = 1,
    task: str = "rating",
    template: str | None = None,
    stage: str = "prompts",
    rows_per_group: int | None = None,
    seed: int = 0,
    scale: float = 0.1,
) -> str:
    """A prompt store at ``uri`` (local or s3://, one file ``part-00000.parquet``) made for the model
    at ``model_path`` (its fingerprint and d from its config: :func:`puma_ray.identity.store_meta`, with
    ``task``, ``template``, ``prompt_length`` and ``stage``), holding uniform random prompts in
    [-``scale``, ``scale``) from ``numpy.random.default_rng(seed)``, drawn row by row in store
    order. ``users``: the ids in store row order, or a count n for ``f"user{j:06d}"``, j < n. One row
    group per ``rows_per_group`` users (default: one for all, as ``schema.write_prompt_store``
    writes). Returns ``uri``."""
    ids = [f"user{j:06d}" for j in range(users)] if isinstance(users, int) else list(users)
    meta = store_meta(model_path, task, template, prompt_length, stage)
    prompts = np.random.default_rng(seed).uniform(-scale, scale, (len(ids), meta.width))
    rows = rows_per_group or max(len(ids), 1)
    with storage.parquet_writer(storage.join(uri, "part-00000.parquet"), prompt_store_schema(meta)) as w:
        for i in range(0, len(ids), rows):
            w.write_table(prompt_table(meta, ids[i : i + rows], prompts[i : i + rows]))
    return uri


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    return build_tiny(str(tmp_path_factory.mktemp("models")))


@pytest.fixture(scope="session")
def rating_data(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("rating"))
    synthesize(out, users=60, task="rating", seed=3, items=200, progress=False)
    return out


@pytest.fixture(scope="session")
def ctr_data(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("ctr"))
    synthesize(out, users=40, task="ctr", seed=4, items=200, progress=False)
    return out


@pytest.fixture(scope="session")
def stage1_cfg(tiny_models, rating_data):
    """Builds the stage-1 tests' config: ``root``/out and ``root``/runs, Llama on the rating data (or
    ``data_dir``), 2 epochs, l = 2, 2 workers with ZeRO-1; ``over`` is merged in."""

    def make(root, data_dir: str = rating_data, task: str = "rating", **over) -> C.PromptsConfig:
        base = {
            "task": task,
            "model": {"path": tiny_models["llama"]},
            "data": {"train": f"{data_dir}/train", "valid": f"{data_dir}/valid"},
            "output": str(root / "out"),
            "prompt_length": 2,
            "train": {"epochs": 2, "batch_size": 64, "lr": 3e-3, "prompt_lr": 3e-2},
            "scaling": {"num_workers": 2, "zero_stage": 1},
            "run": {"name": f"t-{root.name}", "storage_path": str(root / "runs")},
        }
        return C.build(C.PromptsConfig, C.deep_merge(base, over))

    return make


@pytest.fixture(scope="session")
def stage1_run(tmp_path_factory, stage1_cfg, ray_session) -> tuple:
    """That config trained once (2 workers) for the whole suite: (cfg, summary). The tests that only
    read a trained run share it instead of training their own."""
    cfg = stage1_cfg(tmp_path_factory.mktemp("stage1"))
    return cfg, train_prompts(cfg)


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """One local Ray for the whole suite (starting Ray costs seconds). It starts after the S3
    server, so its workers inherit the endpoint and (dummy) credentials from the environment."""
    init_ray(RayConfig(num_cpus=4))
    yield
    ray.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real HTTP S3 endpoint (moto server mode) on loopback, with dummy credentials in the env."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    old = {
        k: os.environ.get(k)
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")
    }
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing-secret-do-not-print",
        AWS_ENDPOINT_URL=endpoint,
        AWS_DEFAULT_REGION="us-east-1",
    )
    yield endpoint
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server) -> str:
    name = f"test-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"
