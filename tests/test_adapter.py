import numpy as np
import pyarrow as pa
import pytest
import torch

from puma_ray.adapter import MigrationAdapter, load_adapter, save_adapter
from puma_ray.errors import PumaError
from puma_ray.rewrite import Rewriter
from puma_ray.schema import StoreMeta

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
