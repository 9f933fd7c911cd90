import pytest
import torch
import torch.nn.functional as F

from puma_ray.config import HeadConfig
from puma_ray.errors import PumaError
from puma_ray.heads import CtrHead, RatingHead, build_head, load_head, save_head
from puma_ray.llm import LMOutput


def test_rating_loss_is_weighted_mse_plus_ce():
    torch.manual_seed(0)
    head = RatingHead(8, mse_weight=0.8, ce_weight=0.2)
    out = LMOutput(answer_logits=torch.randn(4, 5), hidden=None)
    label = torch.tensor([1.0, 2.0, 5.0, 3.0])
    loss, pred = head.loss(out, label)
    want = 0.8 * F.mse_loss(pred, label) + 0.2 * F.cross_entropy(out.answer_logits, torch.tensor([0, 1, 4, 2]))
    assert torch.allclose(loss, want) and pred.shape == (4,)
    dims = [m.in_features for m in head.mlp if isinstance(m, torch.nn.Linear)] + [1]
    assert dims == [5, 32, 12, 1]


def test_hidden_features_head():
    head = RatingHead(8, features="digits_hidden")
    pred = head.predict(LMOutput(torch.randn(3, 5), torch.randn(3, 8)))
    assert pred.shape == (3,) and head.wants_hidden


def test_ctr_head_bce():
    head = CtrHead()
    out = LMOutput(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), None)
    loss, p = head.loss(out, torch.tensor([1.0, 0.0]))
    assert torch.allclose(p, torch.sigmoid(torch.tensor([2.0, -1.0])))
    assert torch.allclose(loss, F.binary_cross_entropy_with_logits(torch.tensor([2.0, -1.0]), torch.tensor([1.0, 0.0])))
    with pytest.raises(PumaError, match="only defined for the rating task"):
        build_head("ctr", 8, HeadConfig(features="digits_hidden"))


def test_save_load_safetensors_json(tmp_path):
    cfg = HeadConfig()
    head = build_head("rating", 16, cfg)
    save_head(str(tmp_path), head, "rating", cfg.model_dump(), "fp1", 16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head.json", "head.safetensors"]
    back = load_head(str(tmp_path), "rating", "fp1")
    for a, b in zip(head.state_dict().values(), back.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(PumaError, match="fingerprint fp1, not fp2"):
        load_head(str(tmp_path), "rating", "fp2")
    with pytest.raises(PumaError, match="task 'rating', not 'ctr'"):
        load_head(str(tmp_path), "ctr")
