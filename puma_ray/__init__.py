"""puma-ray: migrate per-user soft prompts between LLMs (PUMA) on a Ray cluster."""

__version__ = "0.1.0"

# The light modules: importing one never imports torch or transformers (seconds, and gigabytes on a
# GPU node). Ray Data's tasks import them to run their functions, and `puma-ray --help` and `data synth`
# import only these. A light module that needs torch for one function imports it inside that function.
# tests/test_layers.py imports each in a fresh interpreter and fails if torch or transformers loaded.
LIGHT_MODULES = (
    "puma_ray.errors",
    "puma_ray.storage",
    "puma_ray.templates",
    "puma_ray.schema",
    "puma_ray.identity",
    "puma_ray.config",
    "puma_ray.outputs",
    "puma_ray.console",
    "puma_ray.wheels",
    "puma_ray.data",
    "puma_ray.metrics",
    "puma_ray.baselines",
    "puma_ray.profile",
    "puma_ray.select",
    "puma_ray.strategies",
    "puma_ray.datasets.synthetic",
    "puma_ray.report",
    "puma_ray.gate",
    "puma_ray.cli",
)
