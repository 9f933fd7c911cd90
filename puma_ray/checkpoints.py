"""Ray Train checkpoints of the training loop (puma_ray.trainer): safetensors + JSON, nothing pickled.

Rank 0 writes the shared module and the progress; a rank writes its own local part (its prompt
table, with that table's optimizer state), its RNG state and, with ZeRO (partitioned optimizer
state), its part of the shared module's optimizer state (without ZeRO every rank holds the same:
rank 0 writes it). Each rank restores only its own files: a resumed run continues exactly where the
checkpoint left off.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field, fields

import ray.train
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from puma_ray import storage, weights
from puma_ray.errors import PumaError


@dataclass
class Progress:
    epochs_done: int = 0  # = the next epoch to train
    lm_sample_passes: float = 0.0  # samples pushed through the LM in training, all workers, all epochs
    wall_s: float = 0.0  # seconds of the epochs' training steps (validation and checkpoints not counted)
    loop_s: float = 0.0  # seconds inside the epoch loop: training, validation and checkpoints
    metrics: dict = field(default_factory=dict)  # the last epoch's reported metrics


SHARED_FILE = "trainable.safetensors"
STATE_FILE = "state.json"


def rank_file(kind: str, rank: int) -> str:
    return f"{kind}-{rank:05d}.safetensors"


def read_checkpoint_file(ckpt: ray.train.Checkpoint, name: str) -> bytes:
    """One file of a Ray Train checkpoint, read straight from its storage (never the whole checkpoint)."""
    with ckpt.filesystem.open_input_stream(f"{ckpt.path.rstrip('/')}/{name}") as f:
        return f.read()


def torch_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer inside the engine's (DeepSpeed's ZeRO optimizer wraps one)."""
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer):
        opt = opt.optimizer
    return opt


def rng_state() -> dict[str, torch.Tensor]:
    return {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})}


def restore(ckpt, shared: nn.Module, local: nn.Module | None, rank: int, world: int) -> Progress:
    """Load checkpoint ``ckpt`` (None: a new run) into ``shared`` and rank ``rank``'s ``local`` part
    (a worker's prompt table; the run must have as many workers, ``world``, as the checkpoint)."""
    if ckpt is None:
        return Progress()
    state = json.loads(read_checkpoint_file(ckpt, STATE_FILE))
    if local is not None and state["workers"] != world:
        raise PumaError(
            f"checkpoint {ckpt.path} holds prompts partitioned over {state['workers']} workers; "
            f"resume with scaling.num_workers={state['workers']} (or start a new run.name)"
        )
    weights.load_bytes(shared, read_checkpoint_file(ckpt, SHARED_FILE))
    if local is not None:
        weights.load_bytes(local, read_checkpoint_file(ckpt, rank_file("local", rank)))
    return Progress(**{f.name: state[f.name] for f in fields(Progress) if f.name in state})


def restore_optimizer(ckpt, engine, rank: int, zero_stage: int) -> None:
    """The shared module's optimizer state and rank ``rank``'s RNG state, from checkpoint ``ckpt``."""
    if ckpt is None:
        return
    source = rank if zero_stage else 0
    weights.load_optimizer(torch_optimizer(engine), read_checkpoint_file(ckpt, rank_file("optimizer", source)))
    rng = st_load(read_checkpoint_file(ckpt, rank_file("rng", rank)))
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


def save(
    metrics: dict, engine, local: nn.Module | None, rank: int, world: int, progress: Progress, zero_stage: int, run: str
) -> None:
    """Report ``metrics`` with rank ``rank``'s checkpoint files (Ray Train merges the ranks' files into
    one checkpoint); the state records the run's fingerprint ``run`` (trainer.run_fingerprint)."""
    with tempfile.TemporaryDirectory() as d:
        if rank == 0:
            storage.write_bytes(os.path.join(d, SHARED_FILE), weights.to_bytes(engine.module))
            state = {**progress.__dict__, "workers": world, "config_sha256": run}
            storage.write_json(os.path.join(d, STATE_FILE), state)
        if rank == 0 or zero_stage:
            optimizer = weights.optimizer_to_bytes(torch_optimizer(engine))
            storage.write_bytes(os.path.join(d, rank_file("optimizer", rank)), optimizer)
        if local is not None:
            storage.write_bytes(os.path.join(d, rank_file("local", rank)), weights.to_bytes(local))
        storage.write_bytes(os.path.join(d, rank_file("rng", rank)), st_save(rng_state()))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def latest_state(run_uri: str) -> dict | None:
    """The progress state of the latest checkpoint of the Ray Train run at ``run_uri`` (its
    checkpoint_<timestamp>/ directories sort by time); None when it has none."""
    states = storage.list_files(run_uri, suffix=STATE_FILE)
    return storage.read_json(states[-1]) if states else None


def load_final(ckpt: ray.train.Checkpoint, shared: nn.Module) -> tuple[nn.Module, dict]:
    """``shared`` with the weights of checkpoint ``ckpt``, and that checkpoint's progress state."""
    model = weights.load_bytes(shared, read_checkpoint_file(ckpt, SHARED_FILE))
    return model, json.loads(read_checkpoint_file(ckpt, STATE_FILE))
