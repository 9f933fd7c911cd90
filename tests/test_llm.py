"""One test per model family: loads through from_pretrained; forward + backward reach the prompt only."""

import json
import shutil

import pytest
import torch
from transformers import AutoConfig

from puma_ray import identity
from puma_ray.errors import PumaError
from puma_ray.llm import FrozenLM, answer_token_id
from puma_ray.models import FAMILIES

TEXTS = ["zorvak lumina the", "the"]


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("task", ["rating", "ctr"])
def test_family_forward_backward_into_prompt(tiny_models, family, task):
    lm = FrozenLM(tiny_models[family], task, prompt_length=2)
    assert lm.hidden_size == FAMILIES[family][1]
    inputs = lm.collate(TEXTS, [["the"], []])
    prompts = torch.randn(2, 2, lm.hidden_size, requires_grad=True)
    out = lm.forward(prompts, inputs, want_hidden=True)
    assert out.answer_logits.shape == (2, 5 if task == "rating" else 2)
    assert out.hidden.shape == (2, lm.hidden_size)
    out.answer_logits.sum().backward()
    assert prompts.grad is not None and prompts.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in lm.model.parameters())


def test_prompt_changes_answer_and_padding_is_neutral(tiny_models):
    """The prompt must reach the answer logits, and a row's output must not depend on batch padding."""
    lm = FrozenLM(tiny_models["llama"], "rating")
    p = torch.randn(1, 1, lm.hidden_size)
    alone = lm.forward(p, lm.collate(TEXTS[1:])).answer_logits
    padded = lm.forward(p.expand(2, 1, -1), lm.collate(TEXTS)).answer_logits[1:]
    assert torch.allclose(alone, padded, atol=1e-5)
    other = lm.forward(p * 50, lm.collate(TEXTS[1:])).answer_logits
    assert not torch.allclose(alone, other, atol=1e-4)


@pytest.mark.parametrize("fast", [True, False])
def test_collate_layout(tiny_models, fast):
    """Rows are left-padded and end at "Answer:"; on the fast path a row starts at its user's slot
    (the lead before it is cached) and its positions continue the lead's."""
    lm = FrozenLM(tiny_models["qwen2"], "rating", prompt_length=3, fast=fast)
    b = lm.collate(TEXTS)
    ids, mask, pos = b["input_ids"], b["attention_mask"], b["user_pos"]
    assert mask[:, -1].all() and (mask[0] == 1).all() and (mask[1] == 0).any()  # left padding
    assert pos.shape == (2, 3) and (pos[:, 1:] - pos[:, :-1] == 1).all()
    assert (ids[0, -1] == ids[1, -1]) and lm.tokenizer.decode(ids[0, -1:]).strip() == ":"  # ends at "Answer:"
    P = len(lm._lead) if fast else 0
    assert lm.fast == fast and (pos[0, 0] == 0) == fast  # the <UserID> slot opens the row after the lead
    assert (b["position_ids"][1][mask[1].bool()] == P + torch.arange(int(mask[1].sum()))).all()
    if fast:
        assert b["prefix_ids"].shape == (2, 0)  # the paper's template: nothing between the lead and the slot


# The slot early (the paper's), late (item first), and in the middle of a template of one's own
# with the history before the slot and the item after it.
TEMPLATES = {
    "early": None,
    "late": "item_first",
    "middle": "Clicks: <ItemTitleList> ; the user <UserID> ; will the user click <ItemTitle> ? Answer:",
}


def _template(task: str, where: str) -> str | None:
    t = TEMPLATES[where]
    return f"{task}_{t}" if t == "item_first" else t


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("task", ["rating", "ctr"])
@pytest.mark.parametrize("where", sorted(TEMPLATES))
def test_cached_prefixes_and_answer_head_equal_the_full_forward(tiny_models, family, task, where):
    """The fast path (the lead's and each distinct prefix's keys/values computed once and reused,
    the suffix run per row, only the answer rows of the output layer) gives the full forward's
    answer logits, last hidden state and prompt gradients (l = 2), the second time from its cache."""
    template = _template(task, where)
    fast = FrozenLM(tiny_models[family], task, template=template, prompt_length=2)
    full = FrozenLM(tiny_models[family], task, template=template, prompt_length=2, fast=False)
    assert fast.fast and len(fast._lead) > 0 and not full.fast
    texts = ["zorvak lumina the", "the", "lumina", "the"]
    hist = [["the", "zorvak"], [], ["the"], []]
    prompts = torch.randn(4, 2, fast.hidden_size, generator=torch.Generator().manual_seed(1))
    outs = []
    for lm in (full, fast, fast):
        x = prompts.clone().requires_grad_()
        out = lm.forward(x, lm.collate(texts, hist), want_hidden=True)
        (out.answer_logits * torch.arange(1, out.answer_logits.shape[1] + 1)).sum().backward()
        outs.append((out.answer_logits.detach(), out.hidden.detach(), x.grad))
    for got in outs[1:]:
        for a, b in zip(outs[0], got):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), (a - b).abs().max()
    stats = fast.prefix_cache.stats()
    if where == "early":
        assert stats["rows"] == 0  # nothing between the lead and the slot: no per-row prefix
    else:  # rows 2 and 4 share a prefix (item, or history); the second pass finds all three in the cache
        assert (stats["rows"], stats["computed"], stats["entries"]) == (8, 3, 3)


def test_prefix_cache_is_bounded_and_exact(tiny_models):
    """With room for one prefix, the least recently used is evicted and recomputed when needed;
    the logits stay those of the full forward."""
    fast = FrozenLM(tiny_models["llama"], "rating", template="rating_item_first")
    full = FrozenLM(tiny_models["llama"], "rating", template="rating_item_first", fast=False)
    entry_mb = fast.prefix_cache.stats()["mb"]
    fast.forward(torch.zeros(1, 1, fast.hidden_size), fast.collate(["the"]))
    entry_mb = fast.prefix_cache.stats()["mb"]
    fast.prefix_cache.max_bytes = int(entry_mb * 2**20 * 1.5)  # room for one entry of this size
    p = torch.randn(3, 1, fast.hidden_size)
    for texts in (["the", "zorvak", "the"], ["zorvak", "the", "the"]):
        got = fast.forward(p, fast.collate(texts)).answer_logits
        want = full.forward(p, full.collate(texts)).answer_logits
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
    stats = fast.prefix_cache.stats()
    assert stats["entries"] == 1 and stats["mb"] <= fast.prefix_cache.max_bytes / 2**20 and stats["evicted"] >= 1


def test_a_batch_longer_than_the_sliding_window_takes_the_full_forward(tiny_models, capsys):
    """Gemma-3's tiny model has a 128-token sliding window: a batch whose padded span reaches it
    runs the full forward (exact), said once."""
    fast = FrozenLM(tiny_models["gemma3"], "ctr", template="ctr_item_first", max_history_tokens=200)
    full = FrozenLM(tiny_models["gemma3"], "ctr", template="ctr_item_first", max_history_tokens=200, fast=False)
    long = [["zorvak lumina the"] * 60, []]
    p = torch.randn(2, 1, fast.hidden_size)
    for _ in range(2):
        got = fast.forward(p, fast.collate(["the", "the"], long)).answer_logits
    assert torch.allclose(got, full.forward(p, full.collate(["the", "the"], long)).answer_logits, atol=1e-5)
    assert capsys.readouterr().err.count("sliding window") == 1


def test_distinct_texts_are_tokenized_once(tiny_models, monkeypatch):
    lm = FrozenLM(tiny_models["llama"], "ctr")
    calls = []
    real = lm.tokenizer.__class__.__call__
    monkeypatch.setattr(
        lm.tokenizer.__class__,
        "__call__",
        lambda self, texts, **kw: calls.append(list(texts)) or real(self, texts, **kw),
    )
    lm.collate(["the", "zorvak", "the"], [["the"], [], ["the"]])
    lm.collate(["zorvak", "lumina"], [[], ["the"]])
    assert sorted(t for c in calls for t in c) == ["lumina", "none", "the", "zorvak"]  # each text once, ever


def test_answer_tokens_per_tokenizer(tiny_models):
    for family in FAMILIES:
        lm = FrozenLM(tiny_models[family], "rating")
        assert len(set(lm.answer_ids.tolist())) == 5
        assert [lm.tokenizer.decode([i]).strip() for i in lm.answer_ids.tolist()] == ["1", "2", "3", "4", "5"]


def test_answer_token_missing_raises(tiny_models):
    lm = FrozenLM(tiny_models["llama"], "rating")
    with pytest.raises(PumaError, match="no single token for answer"):
        answer_token_id(lm.tokenizer, "Maybe-not-a-token")


def test_dtype_from_config(tiny_models):
    lm = FrozenLM(tiny_models["phi3"], "rating", dtype="bfloat16")
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    out = lm.forward(torch.randn(2, 1, lm.hidden_size), lm.collate(TEXTS))
    assert out.answer_logits.dtype == torch.float32 and torch.isfinite(out.answer_logits).all()


def test_wrong_prompt_width_and_bad_model(tiny_models, tmp_path):
    lm = FrozenLM(tiny_models["llama"], "rating")
    with pytest.raises(PumaError, match=r"prompts have shape \(l=1, d=32\).*takes \(l=1, d=64\)"):
        lm.forward(torch.zeros(2, 1, 32), lm.collate(TEXTS))
    with pytest.raises(PumaError, match="cannot load model"):
        FrozenLM(str(tmp_path / "no-model"), "rating")
    with pytest.raises(PumaError, match="not a built-in id"):
        FrozenLM(tiny_models["llama"], "rating", template="nope")


def test_fingerprints_differ_by_family_not_by_path(tiny_models, tmp_path):
    fps = {f: FrozenLM(p, "rating").fingerprint for f, p in tiny_models.items()}
    assert len(set(fps.values())) == len(fps)
    shutil.copytree(tiny_models["llama"], tmp_path / "copy")
    assert FrozenLM(str(tmp_path / "copy"), "rating").fingerprint == fps["llama"]


def test_model_info_reads_a_config_once_until_it_changes(tiny_models, tmp_path, monkeypatch):
    shutil.copytree(tiny_models["qwen2"], tmp_path / "m")
    path = str(tmp_path / "m")
    reads = []
    real = AutoConfig.from_pretrained
    monkeypatch.setattr(AutoConfig, "from_pretrained", lambda *a, **k: reads.append(a) or real(*a, **k))
    first = identity.model_info(path)
    assert identity.model_info(path) == first and len(reads) == 1
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["hidden_size"] = 1024  # (a longer file, too: a coarse mtime cannot hide it)
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))  # another model at the same path
    assert identity.model_info(path)[1] == 1024 and len(reads) == 2
