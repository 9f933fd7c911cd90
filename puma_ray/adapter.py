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

import numpy as np
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

    ``probe`` > 0 (= l * d_in): a fixed linear readout z = p_flat . probe_w + probe_b of the whole
    prompt (B, l * d_in) -> (B,), fitted before training (:func:`fit_probe`), is appended to each of
    the l vectors as one more input feature: the blocks then take (B, l, d_in + 1).
    """

    def __init__(self, d_in: int, d_out: int, width: int = 4096, depth: int = 1, dropout: float = 0.1, probe: int = 0):
        super().__init__()
        self.d_in, self.d_out, self.width, self.depth, self.dropout = d_in, d_out, width, depth, dropout
        self.probe = probe
        d = d_in + (1 if probe else 0)
        if probe:
            self.register_buffer("probe_w", torch.zeros(probe))
            self.register_buffer("probe_b", torch.zeros(()))
        self.pre = nn.Sequential(*[_Residual(d, width, dropout) for _ in range(depth)])
        self.proj = nn.Sequential(nn.LayerNorm(d), _mlp(d, width, d_out, dropout))
        self.post = nn.Sequential(*[_Residual(d_out, width, dropout) for _ in range(depth)])
        self.out = nn.Sequential(nn.LayerNorm(d_out), _mlp(d_out, width, d_out, dropout))

    @classmethod
    def from_config(
        cls, d_in: int, d_out: int, cfg: AdapterConfig, probe: tuple[np.ndarray, float] | None = None
    ) -> MigrationAdapter:
        """``probe``: (w (l * d_in,), b) of :func:`fit_probe` when ``cfg.probe`` asks for one, else None."""
        if (cfg.probe != "none") != (probe is not None):
            raise PumaError(f"adapter.probe is {cfg.probe!r} but a readout was {'not ' if probe is None else ''}given")
        adapter = cls(d_in, d_out, cfg.width, cfg.depth, cfg.dropout, probe=0 if probe is None else len(probe[0]))
        if probe is not None:
            adapter.probe_w.copy_(torch.as_tensor(probe[0], dtype=torch.float32))
            adapter.probe_b.fill_(float(probe[1]))
        return adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.d_in:
            raise PumaError(f"adapter takes source prompts of width {self.d_in}, got {x.shape[-1]}")
        if self.probe:
            z = x.flatten(1) @ self.probe_w + self.probe_b  # (B,)
            x = torch.cat([x, z[:, None, None].expand(*x.shape[:2], 1)], -1)
        return self.out(self.post(self.proj(self.pre(x))))

    def arch(self) -> dict:
        return {
            "d_in": self.d_in,
            "d_out": self.d_out,
            "width": self.width,
            "depth": self.depth,
            "dropout": self.dropout,
            "probe": self.probe,
        }


def fit_probe(prompts: np.ndarray, label_mean: np.ndarray) -> tuple[np.ndarray, float, float]:
    """A ridge readout of each user's mean training label from their source prompt, in closed form
    (scikit-learn's RidgeCV, the penalty chosen by leave-one-out), standardised so that z has mean 0
    and std 1 over these users. prompts (n, l * d_in), label_mean (n,) -> (w (l * d_in,), b, R^2 of
    the readout's leave-one-out predictions)."""
    from sklearn.linear_model import RidgeCV  # noqa: PLC0415

    x = prompts.astype(np.float64)
    ridge = RidgeCV(alphas=np.logspace(-3, 4, 15), store_cv_results=True).fit(x, label_mean)
    loo_sq = ridge.cv_results_[:, list(ridge.alphas).index(ridge.alpha_)]  # leave-one-out squared errors
    r2 = 1.0 - float(np.mean(loo_sq) / max(np.var(label_mean), 1e-12))
    fitted = x @ ridge.coef_ + ridge.intercept_
    scale = max(float(fitted.std()), 1e-12)
    return ridge.coef_ / scale, float((ridge.intercept_ - fitted.mean()) / scale), r2


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
