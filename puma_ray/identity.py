"""Model identity from a model's config alone: its fingerprint, hidden size and the metadata of a
prompt store made for it. No weights are loaded, and importing this module imports neither torch nor
transformers (a config is read with transformers when a function here is first called), so light
modules and the rewrite's entry can use it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os

from puma_ray import templates
from puma_ray.errors import PumaError
from puma_ray.schema import StoreMeta


def model_fingerprint(config) -> str:
    """A short hash of a transformers config (architecture, widths, vocab), path-independent.

    Left out: where the config was read from and how the weights are stored or run (dtype, attention,
    cache), plus the two keys in which a GGUF-loaded config differs from the same model saved by
    ``models.import_model``: ``quantization_config`` (GGUF storage) and ``architectures`` (the class
    that saved the weights; None in a GGUF). So an import keeps its source's fingerprint.
    """
    d = config.to_dict()
    for k in (
        "_name_or_path",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "_attn_implementation_autoset",
        "use_cache",
        "quantization_config",
        "architectures",
    ):
        d.pop(k, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_info(path: str, gguf_file: str | None = None) -> tuple[str, int]:
    """(fingerprint, hidden size d) of the model at ``path`` from its config alone (no weights loaded).

    ``path`` may be a ``.gguf`` file, or a directory / hub id holding the GGUF named ``gguf_file``: the
    config then comes from the GGUF's metadata (seconds for a large vocabulary: it parses every field).
    """
    if (os.path.isabs(path) or path.startswith(".")) and not os.path.exists(path):  # a path, not a hub id
        raise PumaError(f"{path}: cannot load model config (not found: no model directory or .gguf file there)")
    if gguf_file is None and path.endswith(".gguf"):
        gguf_file = path  # AutoConfig reads a local file named as both the path and the GGUF
    config_file = os.path.join(path, gguf_file) if gguf_file else os.path.join(path, "config.json")
    try:
        st = os.stat(config_file)
    except OSError:  # not a local file (e.g. a hub id): read every time
        return _config_info.__wrapped__(path, gguf_file, None)
    return _config_info(path, gguf_file, (st.st_mtime_ns, st.st_size))


@functools.lru_cache(maxsize=64)
def _config_info(path: str, gguf_file: str | None, stamp: tuple | None) -> tuple[str, int]:
    """:func:`model_info`, once per process for a local config file as it is now (``stamp``: its
    mtime and size): a command asks several times, and a GGUF takes seconds to parse."""
    from transformers import AutoConfig  # noqa: PLC0415 -- transformers imports torch: only when a config is read

    try:
        config = AutoConfig.from_pretrained(path, gguf_file=gguf_file)
    except (OSError, ValueError) as exc:
        raise PumaError(f"{path}: cannot load model config ({str(exc).splitlines()[0]})") from None
    return model_fingerprint(config), int(config.hidden_size)


def store_meta(model_path: str, task: str, template: str | None, prompt_length: int, stage: str) -> StoreMeta:
    """The metadata of a prompt store made for the model at ``model_path`` (its fingerprint and
    width from the config alone) with ``template`` (a built-in id or text; default: the task's) and
    l = ``prompt_length``."""
    fingerprint, d = model_info(model_path)
    t = templates.resolve(template, task)
    return StoreMeta(
        model=model_path,
        model_fingerprint=fingerprint,
        hidden_size=d,
        prompt_length=prompt_length,
        template=t.spec,
        template_hash=t.hash,
        stage=stage,
    )
