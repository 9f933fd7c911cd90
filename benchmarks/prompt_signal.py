"""How much of the soft prompt reaches the answer logits of a tiny random-init LM.

For each family and weight-init std, builds a tiny model (from_config -> save_pretrained ->
from_pretrained), feeds 64 item titles with one fixed prompt and one item with 64 random
prompts, and prints the spread (std) of the answer logits over prompts and over items, and
their ratio. This is why `puma-ray models tiny` uses init std 0.1 rather than 0.02.

    python benchmarks/prompt_signal.py [--out /tmp/prompt_signal]
"""

from __future__ import annotations

import argparse
import json
import tempfile

import numpy as np

from puma_ray.datasets.synthetic import vocabulary


def measure(family: str, init_range: float, texts: list[str], root: str) -> dict:
    """The spread of the answer logits of a tiny ``family`` model with weight-init std ``init_range``:
    over one random prompt per text on the first text, and over ``texts`` (items) under one prompt."""
    import torch
    from transformers import AutoModelForCausalLM

    from puma_ray.llm import FrozenLM
    from puma_ray.models import build_tokenizer, tiny_config

    tok = build_tokenizer()
    cfg = tiny_config(family, len(tok), 2, tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, init_range=init_range)
    torch.manual_seed(0)
    path = f"{root}/{family}-{init_range}"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    lm = FrozenLM(path, "rating")
    scale = lm.model.get_input_embeddings().weight.std().item()
    prompts = torch.randn(len(texts), 1, lm.hidden_size) * scale
    with torch.no_grad():
        over_prompts = lm.forward(prompts, lm.collate([texts[0]] * len(texts))).answer_logits.std(0).mean().item()
        over_items = (
            lm.forward(prompts[:1].expand(len(texts), -1, -1), lm.collate(texts)).answer_logits.std(0).mean().item()
        )
    return {
        "family": family,
        "init_std": init_range,
        "logit_std_over_prompts": over_prompts,
        "logit_std_over_items": over_items,
        "prompt_to_item_ratio": over_prompts / over_items,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="where the tiny models go (default: a temp dir)")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    words = vocabulary()
    texts = [" ".join(rng.choice(words, 4)) for _ in range(64)]
    root = args.out or tempfile.mkdtemp(prefix="prompt_signal_")
    rows = [measure(f, r, texts, root) for f in ("llama", "qwen2", "gemma3", "phi3", "stablelm") for r in (0.02, 0.1)]
    print(json.dumps(rows, indent=1))
    print("\n| family | init std | logit std over prompts | over items | ratio | prompt signal vs init 0.02 |")
    print("|---|---:|---:|---:|---:|---:|")
    base = {r["family"]: r["logit_std_over_prompts"] for r in rows if r["init_std"] == 0.02}
    for r in rows:
        print(
            f"| {r['family']} | {r['init_std']} | {r['logit_std_over_prompts']:.4f} "
            f"| {r['logit_std_over_items']:.4f} | "
            f"{r['prompt_to_item_ratio']:.2f} | {r['logit_std_over_prompts'] / base[r['family']]:.1f}x |"
        )


if __name__ == "__main__":
    main()
