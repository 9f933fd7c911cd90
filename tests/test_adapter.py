import pytest
import torch

from puma_ray.adapter import MigrationAdapter, load_adapter, save_adapter
from puma_ray.errors import PumaError

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
    fp = save_adapter(str(tmp_path), a, SRC, TGT, prompt_length=1)
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
    save_adapter(str(tmp_path / "other"), other, SRC, TGT, 1)
    (tmp_path / "adapter.safetensors").write_bytes((tmp_path / "other" / "adapter.safetensors").read_bytes())
    with pytest.raises(PumaError, match="does not match adapter.json"):
        load_adapter(str(tmp_path))
    (tmp_path / "adapter.safetensors").write_bytes(blob)
