import pytest

from puma_ray import config as C
from puma_ray.errors import PumaError

BASE = {"model": {"path": "m"}, "data": {"train": "t"}, "output": "o"}


def test_defaults_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: {path: m}\ndata: {train: t}\noutput: o\ntrain: {epochs: 2}\n")
    cfg = C.load(
        C.PromptsConfig, str(f), ["train.epochs=5", "scaling.zero_stage=2", "model.dtype=bfloat16", "head.hidden=[8,4]"]
    )
    assert (
        cfg.train.epochs == 5
        and cfg.scaling.zero_stage == 2
        and cfg.model.dtype == "bfloat16"
        and cfg.head.hidden == [8, 4]
    )
    assert cfg.train.lr == 5e-4 and cfg.prompt_length == 1


def test_unknown_key_rejected():
    with pytest.raises(PumaError, match="train.epoch: Extra inputs are not permitted"):
        C.build(C.PromptsConfig, {**BASE, "train": {"epoch": 3}})


def test_bad_values_one_line():
    with pytest.raises(PumaError) as e:
        C.build(C.PromptsConfig, {**BASE, "task": "regression", "train": {"epochs": 0}})
    msg = str(e.value)
    assert "\n" not in msg and "task:" in msg and "train.epochs:" in msg


def test_named_choices_not_integers():
    with pytest.raises(PumaError, match="head.features"):
        C.build(C.PromptsConfig, {**BASE, "head": {"features": 1}})


def test_override_syntax_and_yaml_errors(tmp_path):
    with pytest.raises(PumaError, match="not key=value"):
        C.parse_overrides(["train.epochs"])
    f = tmp_path / "bad.yaml"
    f.write_text("model: [unclosed\n")
    with pytest.raises(PumaError, match="not valid YAML"):
        C.load(C.PromptsConfig, str(f))
    with pytest.raises(PumaError, match="not found"):
        C.load(C.PromptsConfig, str(tmp_path / "missing.yaml"))


def test_migrate_train_keeps_its_own_defaults_under_a_partial_section():
    """A migrate config's partial ``train:`` is laid over the adapter's defaults (MIGRATE_TRAIN:
    the paper's lr/batch/epochs and min_steps), not over stage 1's TrainConfig defaults."""
    base = {"model": {"path": "m"}, "sources": ["s"], "data": {"train": "t"}, "output": "o"}
    full = C.build(C.MigrateConfig, base).train
    assert full == C.MIGRATE_TRAIN and full.min_steps == C.MIGRATE_MIN_STEPS > 0
    part = C.build(C.MigrateConfig, {**base, "train": {"epochs": 2}}).train
    assert (part.epochs, part.lr, part.batch_size, part.min_steps) == (2, 1e-4, 32, C.MIGRATE_MIN_STEPS)
    assert C.build(C.MigrateConfig, {**base, "train": {"min_steps": 0}}).train.min_steps == 0
    assert C.TrainConfig().min_steps == 0  # stage 1: off
