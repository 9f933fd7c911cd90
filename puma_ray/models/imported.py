"""Import of a real checkpoint (a Hugging Face directory, a hub id or a GGUF file) as a plain model
directory that every stage loads with ``from_pretrained`` (``puma-ray models import``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import time

import torch
import transformers

from puma_ray import outputs
from puma_ray.errors import PumaError
from puma_ray.identity import model_fingerprint, model_info
from puma_ray.llm import TORCH_DTYPES

IMPORT_META = "puma_import.json"
# A hub id: "name" or "org/name" (anything else that does not exist locally is a missing path).
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def log(msg: str) -> None:
    """One progress line of ``puma-ray models`` on stderr."""
    print(f"models: {msg}", file=sys.stderr, flush=True)


def _dir_bytes(path: str) -> int:
    """Total size of the files under ``path``."""
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def _resolve_source(src: str, gguf_file: str | None) -> tuple[str, str | None, str]:
    """(where, gguf_file, source) for from_pretrained(where, gguf_file=...): a ``.gguf`` path is split into
    its directory and file name; ``source`` is the absolute local path or the hub id, for the record."""
    path = os.path.expanduser(src)
    if gguf_file is None and path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise PumaError(f"{src}: no such GGUF file")
        path = os.path.abspath(path)
        return os.path.dirname(path), os.path.basename(path), path
    if os.path.isdir(path):
        path = os.path.abspath(path)
        if gguf_file is not None and not os.path.isfile(os.path.join(path, gguf_file)):
            raise PumaError(f"{src}: no GGUF file {gguf_file!r} in this directory")
        return path, gguf_file, path
    if os.path.exists(path) or not HUB_ID.fullmatch(src):
        raise PumaError(f"{src}: no such model directory or GGUF file (and not a hub id)")
    return src, gguf_file, src


def _check_out(out: str, source: str, overwrite: bool = False) -> None:
    """Refuse an ``out`` that is a file, is, lies inside or holds the source, or a non-empty directory that
    no import wrote (unless ``overwrite``): puma_ray.outputs."""
    src = {"src": source if os.path.exists(source) else None}  # a hub id is no local input
    outputs.check_output(out, "models import", src, overwrite, hint=outputs.TOOL_OVERWRITE_HINT)


def _keep_first_layers(model, k: int) -> None:
    """Keep the first ``k`` transformer layers of ``model`` in place; embeddings, final norm and LM head stay.

    The config follows: num_hidden_layers = k, and every per-layer list (a top-level list as long as the
    layer stack, such as Gemma 3's ``layer_types``; token-id lists excepted) keeps its first k entries.
    """

    config = model.config.get_text_config()
    n = config.num_hidden_layers
    decoder = model.get_decoder()
    stack = getattr(decoder, "layers", None)
    if not isinstance(stack, torch.nn.ModuleList) or len(stack) != n:
        raise PumaError(f"{type(model).__name__}: cannot cut layers (no {n}-layer stack at get_decoder().layers)")
    decoder.layers = stack[:k]
    for key, value in config.to_dict().items():
        if isinstance(value, list) and len(value) == n and not key.endswith("token_id"):
            setattr(config, key, value[:k])
    config.num_hidden_layers = k


def import_model(
    src: str,
    out: str,
    gguf_file: str | None = None,
    dtype: str = "float32",
    layers: int | None = None,
    overwrite: bool = False,
) -> dict:
    """Import a pretrained causal LM as a plain safetensors directory ``out`` that from_pretrained loads.

    Args:
        src: a local Hugging Face model directory, a hub id, or a ``.gguf`` file; with ``gguf_file``, the
            directory or hub repository holding that GGUF. GGUF weights are dequantized to ``dtype``.
        out: the output directory: new, empty, or a previous import (replaced).
        dtype: "float32", "bfloat16" or "float16".
        layers: keep only the first ``layers`` transformer layers (plus the final norm and LM head).
        overwrite: replace ``out`` even when no import wrote it (never when it is, lies inside or holds the source).

    Writes the model, its tokenizer and ``out/puma_import.json`` (source, gguf_file, dtype, layers,
    fingerprints of the source and of the import, sizes); the output appears only once complete.
    Returns that record. Raises PumaError (one line) for a bad source, layer count, dtype or ``out``.
    """

    if dtype not in TORCH_DTYPES:
        raise PumaError(f"dtype {dtype!r}: choose from {sorted(TORCH_DTYPES)}")
    where, gguf_file, source = _resolve_source(src, gguf_file)
    out = os.path.abspath(os.path.expanduser(out))
    local_gguf = gguf_file and os.path.isdir(where)  # the input is the GGUF file, not the directory holding it
    _check_out(out, os.path.join(where, gguf_file) if local_gguf else source, overwrite)
    transformers.utils.logging.disable_progress_bar()
    gguf_kw = {"gguf_file": gguf_file} if gguf_file else {}
    t0 = time.perf_counter()
    try:
        config = transformers.AutoConfig.from_pretrained(where, **gguf_kw)
    except (OSError, ValueError) as exc:
        raise PumaError(f"{src}: cannot load model config ({str(exc).splitlines()[0]})") from None
    if type(config) not in transformers.MODEL_FOR_CAUSAL_LM_MAPPING:
        raise PumaError(f"{src}: not a causal LM (model_type {config.model_type!r})")
    n = config.get_text_config().num_hidden_layers
    if layers is not None and not 1 <= layers <= n:
        raise PumaError(f"layers={layers}: must be between 1 and {n} (the layer count of {src})")
    source_fingerprint = model_fingerprint(config)

    what = source if gguf_file in (None, os.path.basename(source)) else f"{source} (GGUF {gguf_file})"
    log(f"loading {what} as {dtype}")
    # dequantize=True: plain dense weights whatever kernels are installed, and transformers then drops the
    # GGUF quantization config itself (save_pretrained refuses a model that still carries it). transformers 4
    # has no GgufConfig: it always dequantizes and keeps no quantization config.
    dense = hasattr(transformers, "GgufConfig") and gguf_file
    quant_kw = {"quantization_config": transformers.GgufConfig(dequantize=True)} if dense else {}
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            where, config=config, dtype=TORCH_DTYPES[dtype], **gguf_kw, **quant_kw
        )
        tokenizer = transformers.AutoTokenizer.from_pretrained(where, **gguf_kw)
    except (OSError, ValueError) as exc:
        raise PumaError(f"{src}: cannot load model/tokenizer ({str(exc).splitlines()[0]})") from None
    load_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    log(
        f"loaded {type(model).__name__}: {n} layers, d={config.get_text_config().hidden_size}, "
        f"{params / 1e6:.1f}M params in {load_s:.1f}s"
    )
    if layers is not None:
        _keep_first_layers(model, layers)
        params = sum(p.numel() for p in model.parameters())
        log(f"kept the first {layers} of {n} layers: {params / 1e6:.1f}M params")

    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.importing-", dir=parent)
    try:
        log(f"saving -> {out}")
        t1 = time.perf_counter()
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        imported_fingerprint, hidden = model_info(staging)
        meta = {
            "source": source,
            "gguf_file": gguf_file,
            "dtype": dtype,
            "layers": layers,
            "model_type": config.model_type,
            "architecture": type(model).__name__,
            "num_hidden_layers": layers or n,
            "source_layers": n,
            "hidden_size": hidden,
            "params": params,
            "fingerprints": {"source": source_fingerprint, "imported": imported_fingerprint},
            "bytes": _dir_bytes(staging),
            "load_seconds": round(load_s, 1),
            "save_seconds": round(time.perf_counter() - t1, 1),
            "transformers_version": transformers.__version__,
        }
        with open(os.path.join(staging, IMPORT_META), "w") as f:
            json.dump(meta, f, indent=2)
        os.chmod(staging, 0o755)
        if os.path.isdir(out):
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"saved {meta['bytes'] / 1e6:.0f} MB in {meta['save_seconds']}s (fingerprint {imported_fingerprint})")
    return meta
