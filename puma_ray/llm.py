"""A frozen causal LM with a text template whose <UserID> slot takes l soft-prompt vectors.

The template is tokenized once, in segments split at its slots; per batch only the item texts
(and CTR histories) are tokenized. Prompts are spliced into the output of
``get_input_embeddings()`` (never a family-specific attribute), rows are left-padded so the
answer position is the last one, and only that position's logits are computed.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from puma_ray.errors import PumaError
from puma_ray.schema import StoreMeta

TEMPLATES = {
    "rating_v1": (
        "We have information about the user's preferences encoded in the feature <UserID> . "
        "Predict the user's rating (an integer between 1 and 5) for the item <ItemTitle> . Answer:"
    ),
    "ctr_v1": (
        "We have information about the user's preferences encoded in the feature <UserID> . "
        "The user recently clicked: <ItemTitleList> . Will the user click the news <ItemTitle> ? "
        "Answer Yes or No. Answer:"
    ),
}
DEFAULT_TEMPLATE = {"rating": "rating_v1", "ctr": "ctr_v1"}
SLOTS = ("<UserID>", "<ItemTitle>", "<ItemTitleList>")
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    if gguf_file is None and path.endswith(".gguf"):
        gguf_file = path  # AutoConfig reads a local file named as both the path and the GGUF
    try:
        config = AutoConfig.from_pretrained(path, gguf_file=gguf_file)
    except (OSError, ValueError) as exc:
        raise PumaError(f"{path}: cannot load model config ({str(exc).splitlines()[0]})") from None
    return model_fingerprint(config), int(config.hidden_size)


def store_meta(model_path: str, task: str, template: str | None, prompt_length: int, stage: str) -> StoreMeta:
    """The metadata of a prompt store made for the model at ``model_path`` (its fingerprint and
    width from the config alone) with ``template`` (default: the task's) and l = ``prompt_length``."""
    fingerprint, d = model_info(model_path)
    return StoreMeta(
        model=model_path,
        model_fingerprint=fingerprint,
        hidden_size=d,
        prompt_length=prompt_length,
        template=template or DEFAULT_TEMPLATE[task],
        stage=stage,
    )


def answer_token_id(tokenizer, word: str) -> int:
    """The single token the model would emit for ``word`` after "Answer:" (e.g. "3", "Yes").

    Tokenizers differ (digit splitting, prefix spaces, Phi-3's leading sub-token), so encode
    " word" and take the last sub-token, checking that it decodes to the word itself.
    """
    for text in (" " + word, word):
        ids = tokenizer.encode(text, add_special_tokens=False)
        if ids and tokenizer.decode(ids[-1:]).strip() == word:
            return ids[-1]
    raise PumaError(f"tokenizer {tokenizer.name_or_path!r} has no single token for answer {word!r}")


@dataclass
class LMOutput:
    """Outputs at the answer position. answer_logits: (B, n_answers); hidden: (B, d) or None."""

    answer_logits: torch.Tensor
    hidden: torch.Tensor | None


class FrozenLM:
    """A frozen causal LM + template. Not an nn.Module on purpose: it is never handed to an optimizer.

    Args:
        path: model id or directory for ``from_pretrained``.
        task: "rating" (answers "1".."5") or "ctr" (answers "Yes", "No").
        template: template id in TEMPLATES (default per task).
        prompt_length: l, the number of prompt vectors in the <UserID> slot.
        max_item_tokens / max_history_tokens: truncation of the per-row texts.
    """

    def __init__(
        self,
        path: str,
        task: str,
        template: str | None = None,
        prompt_length: int = 1,
        dtype: str = "float32",
        attn_implementation: str = "sdpa",
        device: str | torch.device = "cpu",
        max_item_tokens: int = 32,
        max_history_tokens: int = 96,
    ):
        hf_logging.disable_progress_bar()
        self.task, self.path, self.prompt_length = task, path, prompt_length
        self.template = template or DEFAULT_TEMPLATE[task]
        if self.template not in TEMPLATES:
            raise PumaError(f"unknown template {self.template!r}; choose from {sorted(TEMPLATES)}")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForCausalLM.from_pretrained(
                path, dtype=TORCH_DTYPES[dtype], attn_implementation=attn_implementation
            )
        except (OSError, ValueError) as exc:
            raise PumaError(f"{path}: cannot load model/tokenizer ({str(exc).splitlines()[0]})") from None
        self.model.requires_grad_(False).eval().to(device)
        self.device = torch.device(device)
        self.hidden_size = int(self.model.get_input_embeddings().embedding_dim)
        self.fingerprint = model_fingerprint(self.model.config)
        answers = ["1", "2", "3", "4", "5"] if task == "rating" else ["Yes", "No"]
        self.answer_ids = torch.tensor([answer_token_id(self.tokenizer, w) for w in answers], device=self.device)
        self.max_item_tokens, self.max_history_tokens = max_item_tokens, max_history_tokens
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._segments = self._tokenize_template(TEMPLATES[self.template])

    @classmethod
    def from_config(cls, cfg, device: str | torch.device = "cpu") -> FrozenLM:
        """The LM a stage config names: ``cfg.model`` (path, dtype, attention), ``cfg.task``,
        ``cfg.template`` and ``cfg.prompt_length``."""
        m = cfg.model
        return cls(m.path, cfg.task, cfg.template, cfg.prompt_length, m.dtype, m.attn_implementation, device)

    def _tokenize_template(self, text: str) -> list:
        """Template -> list of token-id lists (static text) and slot names, tokenized once."""
        parts = [p for p in re.split("(" + "|".join(map(re.escape, SLOTS)) + ")", text) if p.strip()]
        if parts.count("<UserID>") != 1:
            raise PumaError(f"template {self.template!r} must contain <UserID> exactly once")
        out, first = [], True
        for p in parts:
            if p in SLOTS:
                out.append(p)
            else:
                out.append(self.tokenizer.encode(p.strip(), add_special_tokens=first))
            first = False
        return out

    def collate(self, item_text, history_text=None) -> dict[str, torch.Tensor]:
        """Per-row texts -> left-padded model inputs.

        Returns input_ids (B, T), attention_mask (B, T), position_ids (B, T) and
        user_pos (B, l): the positions the prompt vectors go to.
        """
        items = self.tokenizer(list(item_text), add_special_tokens=False)["input_ids"]
        hists = None
        if "<ItemTitleList>" in self._segments:
            hists = [
                " ; ".join(h) if h is not None and len(h) else "none"
                for h in (history_text if history_text is not None else [None] * len(items))
            ]
            hists = self.tokenizer(hists, add_special_tokens=False)["input_ids"]
        rows, user_pos = [], []
        for i, item in enumerate(items):
            ids: list[int] = []
            for seg in self._segments:
                if seg == "<UserID>":
                    user_pos.append(range(len(ids), len(ids) + self.prompt_length))
                    ids += [self.pad_id] * self.prompt_length
                elif seg == "<ItemTitle>":
                    ids += item[: self.max_item_tokens]
                elif seg == "<ItemTitleList>":
                    ids += hists[i][-self.max_history_tokens :]
                else:
                    ids += seg
            rows.append(ids)
        T = max(map(len, rows))
        input_ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        pos = torch.zeros((len(rows), self.prompt_length), dtype=torch.long)
        for i, ids in enumerate(rows):
            pad = T - len(ids)
            input_ids[i, pad:] = torch.tensor(ids)
            mask[i, pad:] = 1
            pos[i] = torch.tensor(list(user_pos[i])) + pad
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        return {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids, "user_pos": pos}

    def forward(self, prompts: torch.Tensor, inputs: dict[str, torch.Tensor], want_hidden: bool = False) -> LMOutput:
        """prompts (B, l, d) spliced at inputs["user_pos"] -> answer logits (B, n_answers) [+ hidden (B, d)].

        Gradients flow into ``prompts``; the LM's own weights stay frozen.
        """
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        B, l, d = prompts.shape
        if d != self.hidden_size or l != self.prompt_length:
            raise PumaError(
                f"prompts have shape (l={l}, d={d}); "
                f"model {self.path!r} takes (l={self.prompt_length}, d={self.hidden_size})"
            )
        emb = self.model.get_input_embeddings()(inputs["input_ids"])  # (B, T, d)
        rows = torch.arange(B, device=self.device).repeat_interleave(l)
        emb = emb.index_put((rows, inputs["user_pos"].reshape(-1)), prompts.reshape(B * l, d).to(emb.dtype))
        out = self.model(
            inputs_embeds=emb,
            attention_mask=inputs["attention_mask"],
            position_ids=inputs["position_ids"],
            logits_to_keep=1,
            output_hidden_states=want_hidden,
            use_cache=False,
        )
        logits = out.logits[:, -1, :].float()  # (B, V)
        hidden = out.hidden_states[-1][:, -1, :].float() if want_hidden else None
        return LMOutput(answer_logits=logits.index_select(-1, self.answer_ids), hidden=hidden)
