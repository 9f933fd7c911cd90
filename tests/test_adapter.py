import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from puma_ray.adapter import MigrationAdapter, fit_probe, load_adapter, save_adapter
from puma_ray.config import AdapterConfig
from puma_ray.errors import PumaError
from puma_ray.profile import PROFILE_SCHEMA
from puma_ray.rewrite import Rewriter
from puma_ray.schema import StoreMeta, write_prompt_store
from puma_ray.sources import Sources
from puma_ray.stage2 import probe_readout

SRC = [{"model": "a", "model_fingerprint": "fa", "hidden_size": 8}]
TGT = {"model": "b", "model_fingerprint": "fb", "hidden_size": 12}


def test_shapes_and_gradient_flow():
    torch.manual_seed(0)
    a = MigrationAdapter(8, 12, width=16, depth=2, dropout=0.1)
    x = torch.randn(5, 3, 8)
    y = a(x)
    assert y.shape == (5, 3, 12)
    y.pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in a.parameters())
    assert len(a.pre) == 2 and len(a.post) == 2


def test_reference_size():
    """The paper's adapter: 88.1M parameters for 2048 -> 3072 with h = 4096."""
    a = MigrationAdapter(2048, 3072, width=4096, depth=1)
    assert round(sum(p.numel() for p in a.parameters()) / 1e6, 1) == 88.1


def test_eval_is_deterministic_train_uses_dropout():
    a = MigrationAdapter(8, 12, width=16, dropout=0.5)
    x = torch.randn(4, 1, 8)
    a.eval()
    assert torch.equal(a(x), a(x))
    a.train()
    assert not torch.equal(a(x), a(x))


def test_save_load_and_refusals(tmp_path):
    a = MigrationAdapter(8, 12, width=16)
    fp = save_adapter(str(tmp_path), a, SRC, TGT, prompt_length=1, template="rating_v1")
    b, meta = load_adapter(str(tmp_path), ["fa"], "fb")
    assert meta["fingerprint"] == fp and meta["arch"]["width"] == 16
    x = torch.randn(2, 1, 8)
    assert torch.equal(a.eval()(x), b(x))
    with pytest.raises(PumaError, match=r"trained on source model\(s\) \['a'\]"):
        load_adapter(str(tmp_path), ["zz"], "fb")
    with pytest.raises(PumaError, match="trained for target model 'b'"):
        load_adapter(str(tmp_path), ["fa"], "zz")
    with pytest.raises(PumaError, match="adapter takes source prompts of width 8, got 6"):
        b(torch.randn(2, 1, 6))
    blob = (tmp_path / "adapter.safetensors").read_bytes()
    other = MigrationAdapter(8, 12, width=16)
    save_adapter(str(tmp_path / "other"), other, SRC, TGT, 1, "rating_v1")
    (tmp_path / "adapter.safetensors").write_bytes((tmp_path / "other" / "adapter.safetensors").read_bytes())
    with pytest.raises(PumaError, match="does not match adapter.json"):
        load_adapter(str(tmp_path))
    (tmp_path / "adapter.safetensors").write_bytes(blob)


def test_label_mean_probe_reads_the_level_and_travels_with_the_adapter(tmp_path):
    """adapter.probe: label_mean. The closed-form readout recovers a level written linearly into the
    prompts (standardised: mean 0, std 1 over the fit users), the adapter appends it as one input
    feature, and the fixed readout is saved and loaded with the weights (not trained)."""
    rng = np.random.default_rng(0)
    prompts = rng.normal(size=(400, 2 * 8)).astype(np.float32)  # 400 users, l = 2, d = 8
    direction = rng.normal(size=16)
    level = 3.5 + 0.4 * prompts @ direction / np.linalg.norm(direction) + rng.normal(scale=0.1, size=400)
    w, b, r2 = fit_probe(prompts, level)
    z = prompts @ w + b
    assert r2 > 0.8 and np.corrcoef(z, level)[0, 1] > 0.9
    assert abs(z.mean()) < 1e-6 and abs(z.std() - 1) < 1e-6
    *_, noise_r2 = fit_probe(prompts, rng.normal(size=400))  # no level in the prompts
    assert noise_r2 < 0.05

    torch.manual_seed(0)
    a = MigrationAdapter.from_config(8, 12, AdapterConfig(width=16, probe="label_mean"), (w, b))
    assert a.arch()["probe"] == 16 and a.proj[0].normalized_shape == (9,)
    x = torch.from_numpy(prompts[:5]).view(5, 2, 8)
    a.eval()
    shifted = x.clone()
    shifted[0] += torch.from_numpy(w.reshape(2, 8)) * 0.5  # changes user 0's readout only
    assert not torch.allclose(a(x)[0], a(shifted)[0]) and torch.equal(a(x)[1:], a(shifted)[1:])
    assert not any(n.startswith("probe") for n, _ in a.named_parameters())  # fixed, never trained

    save_adapter(str(tmp_path), a, SRC, TGT, prompt_length=2, template="rating_v1")
    loaded, meta = load_adapter(str(tmp_path), ["fa"], "fb")
    assert meta["arch"]["probe"] == 16 and torch.equal(loaded(x), a(x))
    assert np.allclose(loaded.probe_w.numpy(), w) and float(loaded.probe_b) == pytest.approx(b)


def test_rewriter_maps_a_batch_and_refuses_bad_prompts(tmp_path):
    """The rewrite's map_batches class on its own: shapes, metadata, NaN and width refusals."""

    a = MigrationAdapter(8, 12, width=16)
    save_adapter(str(tmp_path), a, SRC, TGT, prompt_length=2, template="rating_v1")
    meta = StoreMeta(
        model="b", model_fingerprint="fb", hidden_size=12, prompt_length=2, template="rating_v1", stage="rewrite"
    )
    rw = Rewriter(str(tmp_path), meta.__dict__)

    def batch(p):
        return pa.table(
            {
                "user_id": [f"u{i}" for i in range(len(p))],
                "prompt": pa.FixedSizeListArray.from_arrays(pa.array(p.reshape(-1).astype(np.float32)), p.shape[1]),
            }
        )

    x = np.random.default_rng(0).normal(size=(3, 16))
    out = rw(batch(x))
    assert out.column("user_id").to_pylist() == ["u0", "u1", "u2"] and out.schema.field("prompt").type.list_size == 24
    assert StoreMeta.from_metadata("x", out.schema.metadata) == meta
    want = a.eval()(torch.tensor(x, dtype=torch.float32).view(3, 2, 8)).reshape(3, -1).detach().numpy()
    got = np.asarray(out.column("prompt").combine_chunks().flatten().to_numpy()).reshape(3, 24)
    assert np.allclose(got, want, atol=1e-6)
    x[1, 3] = np.nan
    with pytest.raises(PumaError, match=r"1 source prompt\(s\) contain NaN or Inf, e.g. users \['u1'\]"):
        rw(batch(x))
    with pytest.raises(PumaError, match="source prompts have width 10, expected l\\*d = 16"):
        rw(batch(np.zeros((2, 10))))


def test_probe_readout_reads_a_store_and_a_profile(tmp_path):
    """stage2.probe_readout: the readout is fitted on the users of the profile's hashed sample that have
    a prompt (a prompt without a profile row and a profile row without a prompt are both skipped);
    too few users is one line."""
    rng = np.random.default_rng(1)
    meta = StoreMeta(model="a", model_fingerprint="fa", hidden_size=4, prompt_length=2, template="rating_v1", stage="x")
    ids = [f"u{i:03d}" for i in range(300)]
    prompts = rng.normal(size=(300, 8)).astype(np.float32)
    level = 3.0 + prompts[:, 0] - 0.5 * prompts[:, 5]
    write_prompt_store(str(tmp_path / "store"), meta, ids[:280], prompts[:280])  # 20 users without a prompt
    profile = pa.table(
        {"user_id": ids[20:], "n": [10] * 280, "label_mean": level[20:], "label_var": [1.0] * 280},  # 20 without labels
        schema=PROFILE_SCHEMA,
    )
    pq.write_table(profile, tmp_path / "profile.parquet")
    src = Sources(str(tmp_path / "store"), meta, [meta])
    w, b = probe_readout(AdapterConfig(probe="label_mean"), src, str(tmp_path / "profile.parquet"), 280)
    z = prompts @ w + b
    assert np.corrcoef(z[20:280], level[20:280])[0, 1] > 0.99
    assert probe_readout(AdapterConfig(), src, str(tmp_path / "profile.parquet"), 280) is None
    with pytest.raises(PumaError, match=r"adapter.probe: [01] user\(s\) of .* raise adapter.probe_users"):
        probe_readout(AdapterConfig(probe="label_mean", probe_users=2), src, str(tmp_path / "profile.parquet"), 1e9)
