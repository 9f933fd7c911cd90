"""The migration adapter Phi: source prompt vectors -> target prompt vectors.

Reference architecture (METHOD.md, "Stage 2"), pre-LayerNorm residual MLPs with SiLU + dropout;
``depth`` residual blocks on each side of the width-changing projection (depth=1 is the paper's):

    x = x + MLP(LN(x))   (depth times)    d_in -> h -> d_in
    y = MLP(LN(x))                        d_in -> h -> d_out
    y = y + MLP(LN(y))   (depth times)    d_out -> h -> d_out
    out = MLP(LN(y))                      d_out -> h -> d_out

Saved as ``adapter.safetensors`` + ``adapter.json``; the JSON carries both sides' model
fingerprints so a wrong pairing is refused at load.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from puma_ray import storage, templates, weights
from puma_ray.config import AdapterConfig
from puma_ray.errors import PumaError


def _mlp(d_in: int, h: int, d_out: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, h), nn.SiLU(), nn.Dropout(dropout), nn.Linear(h, d_out))


class _Residual(nn.Module):
    def __init__(self, d: int, h: int, dropout: float):
        super().__init__()
        self.norm, self.mlp = nn.LayerNorm(d), _mlp(d, h, d, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class MigrationAdapter(nn.Module):
    """(B, l, d_in) -> (B, l, d_out), applied to each of the l prompt vectors.

    ``rank`` (None: off): the source prompts are first whitened onto their top ``rank`` principal
    components, (x - mean) @ basis / scale (B, l, rank), a fixed map fitted on the source store
    (:func:`whitening`, :meth:`set_whitening`; buffers, saved with the weights), and the blocks run
    on those ``rank`` dimensions. ``linear``: a linear path rank|d_in -> d_out added to the blocks'
    output, whose last layer then starts at zero (the adapter starts linear)."""

    def __init__(
        self,
        d_in: int,
        d_out: int,
        width: int = 4096,
        depth: int = 1,
        dropout: float = 0.1,
        rank: int | None = None,
        linear: bool = False,
    ):
        super().__init__()
        self.d_in, self.d_out, self.width, self.depth, self.dropout = d_in, d_out, width, depth, dropout
        self.rank, self.linear = rank, linear
        k = rank or d_in
        if rank:
            self.register_buffer("in_mean", torch.zeros(d_in))
            self.register_buffer("in_basis", torch.eye(d_in, rank))
            self.register_buffer("in_scale", torch.ones(rank))
        self.pre = nn.Sequential(*[_Residual(k, width, dropout) for _ in range(depth)])
        self.proj = nn.Sequential(nn.LayerNorm(k), _mlp(k, width, d_out, dropout))
        self.post = nn.Sequential(*[_Residual(d_out, width, dropout) for _ in range(depth)])
        self.out = nn.Sequential(nn.LayerNorm(d_out), _mlp(d_out, width, d_out, dropout))
        self.skip = nn.Linear(k, d_out) if linear else None
        if linear:
            nn.init.zeros_(self.out[-1][-1].weight)
            nn.init.zeros_(self.out[-1][-1].bias)

    @classmethod
    def from_config(cls, d_in: int, d_out: int, cfg: AdapterConfig) -> MigrationAdapter:
        return cls(d_in, d_out, cfg.width, cfg.depth, cfg.dropout, cfg.rank, cfg.linear)

    @torch.no_grad()
    def set_whitening(self, whiten: dict[str, torch.Tensor]) -> None:
        """Set the input whitening (``rank``) to :func:`whitening`'s result."""
        for name, value in whiten.items():
            getattr(self, name).copy_(value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.d_in:
            raise PumaError(f"adapter takes source prompts of width {self.d_in}, got {x.shape[-1]}")
        if self.rank:
            x = (x - self.in_mean) @ self.in_basis / self.in_scale
        y = self.out(self.post(self.proj(self.pre(x))))
        return y if self.skip is None else y + self.skip(x)

    def arch(self) -> dict:
        return {
            "d_in": self.d_in,
            "d_out": self.d_out,
            "width": self.width,
            "depth": self.depth,
            "dropout": self.dropout,
            "rank": self.rank,
            "linear": self.linear,
        }


def whitening(prompts: torch.Tensor, rank: int) -> dict[str, torch.Tensor]:
    """The input whitening of a ``rank`` adapter, fitted on source prompt vectors (n, d_in): their
    mean (d_in,), top principal directions (d_in, rank) and the std along each (rank,); directions
    the prompts do not span (beyond n - 1, or of no variance) are zero (scale 1)."""
    x = prompts.double()
    mean = x.mean(0)
    _, sv, vt = torch.linalg.svd(x - mean, full_matrices=False)
    k = min(rank, int((sv > sv[:1] * 1e-6).sum()))
    basis = torch.zeros(x.shape[1], rank, dtype=torch.float64)
    basis[:, :k] = vt[:k].T
    scale = torch.ones(rank, dtype=torch.float64)
    scale[:k] = (sv[:k] / max(1, len(x) - 1) ** 0.5).clamp(min=1e-6)
    return {"in_mean": mean.float(), "in_basis": basis.float(), "in_scale": scale.float()}


def adapter_fingerprint(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()[:16]


def save_adapter(
    uri_dir: str, adapter: MigrationAdapter, sources: list[dict], target: dict, prompt_length: int, template: str
) -> str:
    """Write adapter.safetensors + adapter.json; returns the adapter fingerprint (hash of the weights).

    sources: [{"model", "model_fingerprint", "hidden_size"}...] in concatenation order; target: same
    keys; template: the template (id or text) it was trained under, with its text hash.
    """
    blob = weights.to_bytes(adapter)
    fp = adapter_fingerprint(blob)
    storage.write_bytes(storage.join(uri_dir, "adapter.safetensors"), blob)
    storage.write_json(
        storage.join(uri_dir, "adapter.json"),
        {
            "arch": adapter.arch(),
            "sources": sources,
            "target": target,
            "prompt_length": prompt_length,
            "template": template,
            "template_hash": templates.spec_hash(template),
            "fingerprint": fp,
        },
    )
    return fp


def load_adapter(
    uri_dir: str, source_fingerprints: list[str] | None = None, target_fingerprint: str | None = None
) -> tuple[MigrationAdapter, dict]:
    """-> (adapter in eval mode, its JSON). Refuses a pairing whose model fingerprints differ."""
    meta = storage.read_json(storage.join(uri_dir, "adapter.json"))
    have_src = [s["model_fingerprint"] for s in meta["sources"]]
    if source_fingerprints is not None and list(source_fingerprints) != have_src:
        raise PumaError(
            f"{uri_dir}: adapter was trained on source model(s) {[s['model'] for s in meta['sources']]} "
            f"(fingerprints {have_src}), not {list(source_fingerprints)}"
        )
    if target_fingerprint is not None and meta["target"]["model_fingerprint"] != target_fingerprint:
        raise PumaError(
            f"{uri_dir}: adapter was trained for target model {meta['target']['model']!r} "
            f"(fingerprint {meta['target']['model_fingerprint']}), not {target_fingerprint}"
        )
    adapter = MigrationAdapter(**meta["arch"])
    blob = storage.read_bytes(storage.join(uri_dir, "adapter.safetensors"))
    if adapter_fingerprint(blob) != meta["fingerprint"]:
        raise PumaError(
            f"{uri_dir}: adapter.safetensors does not match adapter.json (fingerprint mismatch: corrupt or mixed files)"
        )
    return weights.load_bytes(adapter, blob).eval(), meta
