"""Module weights <-> safetensors bytes: the one place weights are serialised (nothing is ever unpickled).

Adapters, heads and training checkpoints all go through these two functions; where the bytes go
(a storage URI, a Ray Train checkpoint directory) is the caller's business.
"""

from __future__ import annotations

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
