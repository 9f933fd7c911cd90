"""Task heads on the LM's answer-position outputs, and their safetensors + JSON persistence.

rating: CE over the five digit logits ("1".."5", class = rating-1) plus an MLP 5 -> 32 -> 12 -> 1
        regressing the rating with MSE; loss = mse_weight * MSE + ce_weight * CE; prediction = MLP.
        ``features: digits_hidden`` feeds [digit logits ; last hidden state] to the MLP instead.
ctr:    BCE on a * (logit(Yes) - logit(No)) + b; prediction = its sigmoid (a=1, b=0 is the paper's).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from puma_ray import storage, weights
from puma_ray.errors import PumaError
from puma_ray.llm import LMOutput


class Head(Protocol):
    """What every task head offers (heads are nn.Modules: they train inside the engine)."""

    wants_hidden: bool  # forward needs the LM's last hidden state at the answer position

    def loss(self, out: LMOutput, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (scalar loss: the mean of row_loss, (B,) predictions); label (B,)."""
        ...

    def row_loss(self, out: LMOutput, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> ((B,) per-row training loss, (B,) predictions); label (B,)."""
        ...

    def predict(self, out: LMOutput) -> torch.Tensor:
        """-> (B,) predictions (rating, or click probability)."""
        ...


class RatingHead(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        features: str = "digits",
        hidden: list[int] = (32, 12),
        mse_weight: float = 0.8,
        ce_weight: float = 0.2,
    ):
        super().__init__()
        self.features, self.mse_weight, self.ce_weight = features, mse_weight, ce_weight
        dims = [5 + (hidden_size if features == "digits_hidden" else 0), *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.mlp = nn.Sequential(*layers, nn.Linear(dims[-1], 1))
        nn.init.constant_(self.mlp[-1].bias, 3.0)  # start at the middle of the 1..5 scale

    @property
    def wants_hidden(self) -> bool:
        return self.features == "digits_hidden"

    def predict(self, out: LMOutput) -> torch.Tensor:
        """(B, 5) digit logits [+ (B, d) hidden] -> (B,) predicted rating."""
        x = out.answer_logits if not self.wants_hidden else torch.cat([out.answer_logits, out.hidden], -1)
        return self.mlp(x).squeeze(-1)

    def row_loss(self, out: LMOutput, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> ((B,) mse_weight * squared error + ce_weight * digit CE, (B,) predictions). label: (B,) 1..5."""
        pred = self.predict(out)
        ce = F.cross_entropy(out.answer_logits, (label.round().long() - 1).clamp(0, 4), reduction="none")
        return self.mse_weight * (pred - label) ** 2 + self.ce_weight * ce, pred

    def loss(self, out: LMOutput, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (scalar loss, (B,) predictions). label: (B,) ratings 1..5."""
        rows, pred = self.row_loss(out, label)
        return rows.mean(), pred


class CtrHead(nn.Module):
    wants_hidden = False

    def __init__(self, hidden_size: int = 0, **_):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))  # (1,): DeepSpeed cannot broadcast 0-dim params
        self.bias = nn.Parameter(torch.zeros(1))

    def logit(self, out: LMOutput) -> torch.Tensor:
        """(B, 2) [Yes, No] logits -> (B,) click logit."""
        return self.scale * (out.answer_logits[:, 0] - out.answer_logits[:, 1]) + self.bias

    def predict(self, out: LMOutput) -> torch.Tensor:
        return torch.sigmoid(self.logit(out))

    def row_loss(self, out: LMOutput, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.logit(out)
        return F.binary_cross_entropy_with_logits(z, label, reduction="none"), torch.sigmoid(z)

    def loss(self, out: LMOutput, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows, pred = self.row_loss(out, label)
        return rows.mean(), pred


def build_head(task: str, hidden_size: int, head_cfg) -> Head:
    """head_cfg: config.HeadConfig (or its dict)."""
    h = head_cfg if isinstance(head_cfg, dict) else head_cfg.model_dump()
    if task == "rating":
        return RatingHead(hidden_size, h["features"], h["hidden"], h["mse_weight"], h["ce_weight"])
    if h.get("features", "digits") != "digits":
        raise PumaError("head.features=digits_hidden is only defined for the rating task")
    return CtrHead(hidden_size)


HEAD_FILES = ("head.safetensors", "head.json")  # what save_head writes into its directory


def save_head(uri_dir: str, head: Head, task: str, head_cfg: dict, model_fingerprint: str, hidden_size: int) -> None:
    """uri_dir/head.safetensors + uri_dir/head.json (:data:`HEAD_FILES`)."""
    storage.write_bytes(storage.join(uri_dir, HEAD_FILES[0]), weights.to_bytes(head))
    storage.write_json(
        storage.join(uri_dir, HEAD_FILES[1]),
        {
            "task": task,
            "head": head_cfg,
            "model_fingerprint": model_fingerprint,
            "hidden_size": hidden_size,
        },
    )


def load_head(uri_dir: str, task: str, model_fingerprint: str | None = None) -> Head:
    meta = storage.read_json(storage.join(uri_dir, "head.json"))
    if meta["task"] != task:
        raise PumaError(f"{uri_dir}: head is for task {meta['task']!r}, not {task!r}")
    if model_fingerprint is not None and meta["model_fingerprint"] != model_fingerprint:
        raise PumaError(
            f"{uri_dir}: head was trained on model fingerprint {meta['model_fingerprint']}, not {model_fingerprint}"
        )
    head = build_head(task, meta["hidden_size"], meta["head"])
    return weights.load_bytes(head, storage.read_bytes(storage.join(uri_dir, "head.safetensors"))).eval()
