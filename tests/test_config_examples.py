"""Every example under configs/ parses into its stage's config and says how to run it."""

import pathlib

import pytest

from puma_ray import config as C

CONFIGS = sorted((pathlib.Path(__file__).parent.parent / "configs").glob("*.yaml"))
CLASSES = {
    "prompts": C.PromptsConfig,
    "evaluate": C.EvaluateConfig,
    "migrate": C.MigrateConfig,
    "rewrite": C.RewriteJobConfig,
    "tune": C.TuneConfig,
    "coldstart": C.ColdStartConfig,
}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_config(path):
    cls = CLASSES[path.name.split("_")[0]]
    cfg = C.load(cls, str(path))
    assert isinstance(cfg, cls)
    assert path.read_text().startswith("#") and "puma-ray" in path.read_text().splitlines()[0] + path.read_text()[:600]
