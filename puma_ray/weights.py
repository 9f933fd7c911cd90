"""Module weights and optimizer state <-> safetensors bytes: the one place they are serialised
(nothing is ever pickled or unpickled: tensors in safetensors, everything else as JSON in its header).

Adapters, heads and training checkpoints all go through these functions; where the bytes go (a
storage URI, a Ray Train checkpoint directory) is the caller's business.
"""

from __future__ import annotations

import json
import struct

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn


def cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s state_dict as detached, contiguous CPU tensors (what safetensors writes)."""
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def to_bytes(module: nn.Module) -> bytes:
    """``module``'s weights as safetensors bytes."""
    return st_save(cpu_state(module))


def load_bytes(module: nn.Module, blob: bytes) -> nn.Module:
    """Load safetensors ``blob`` into ``module`` (strict: every key must match); returns ``module``."""
    module.load_state_dict(st_load(blob))
    return module


def optimizer_to_bytes(optimizer: torch.optim.Optimizer, extra: dict[str, torch.Tensor] | None = None) -> bytes:
    """A torch optimizer's state (moments, step counts) as safetensors bytes; its param groups and
    non-tensor state as JSON in the header's metadata. ``extra``: more tensors (e.g. RNG states)."""
    sd = optimizer.state_dict()
    tensors, plain = {}, {}
    for i, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{i}.{k}"] = v.detach().cpu().contiguous()
            else:
                plain[f"{i}.{k}"] = v
    meta = {"param_groups": json.dumps(sd["param_groups"]), "plain": json.dumps(plain)}
    return st_save({**tensors, **{f"extra.{k}": v.contiguous() for k, v in (extra or {}).items()}}, metadata=meta)


def load_optimizer(optimizer: torch.optim.Optimizer, blob: bytes) -> dict[str, torch.Tensor]:
    """Load :func:`optimizer_to_bytes` output into ``optimizer``; returns its ``extra`` tensors."""
    (size,) = struct.unpack("<Q", blob[:8])
    meta = json.loads(blob[8 : 8 + size])["__metadata__"]
    tensors = st_load(blob)
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        kind, _, rest = key.partition(".")
        if kind == "state":
            i, name = rest.split(".", 1)
            state.setdefault(int(i), {})[name] = v
    for key, v in json.loads(meta["plain"]).items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    return {k[len("extra.") :]: v for k, v in tensors.items() if k.startswith("extra.")}
