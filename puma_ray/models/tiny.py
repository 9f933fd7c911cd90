"""Tiny random-init causal LMs of several families + a word-level tokenizer for the synthetic data.

They are saved with ``save_pretrained`` and every stage loads them back through
``AutoModelForCausalLM/AutoTokenizer.from_pretrained(path)``: the same path a hub model id takes.
"""

from __future__ import annotations

import os
import sys

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from puma_ray.datasets.synthetic import vocabulary
from puma_ray.errors import PumaError
from puma_ray.templates import BUILTIN

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
    (their spread over random prompts is ~0.01), at 0.1 it passes ~25x more
    (benchmarks/RESULTS.md, "What this testbed can and cannot show").
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
