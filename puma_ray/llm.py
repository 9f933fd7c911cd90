"""A frozen causal LM with a text template whose <UserID> slot takes l soft-prompt vectors.

What a training step does not recompute:
- the template: tokenized once, in segments split at its slots; every distinct item text (and
  CTR history) is tokenized once and remembered;
- the static text before <UserID> (the prefix, the same for every row and user): its keys and
  values are computed once per model and reused by every row (a KV cache expanded to the batch),
  so no row runs a forward or backward through it;
- the output layer: only the answer tokens' rows of it are applied, at the answer position only
  (5 or 2 of a vocabulary of up to 262k), with the family's logit soft-capping where it has one.
Both shortcuts are checked against the model's own full forward on a probe row when the model
loads; a family where they disagree falls back to the full forward (and says so in the log).

Prompts are spliced into the output of ``get_input_embeddings()`` (never a family-specific
attribute); rows are left-padded so the answer position is the last one.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, DynamicCache
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


def row_texts(rows) -> tuple[list[str], list | None]:
    """An Arrow table of rows -> (item texts, CTR histories or None): what :meth:`FrozenLM.collate` takes."""
    history = rows.column("history_text").to_pylist() if "history_text" in rows.column_names else None
    return rows.column("item_text").to_pylist(), history


@dataclass
class LMOutput:
    """Outputs at the answer position. answer_logits: (B, n_answers); hidden: (B, d) or None."""

    answer_logits: torch.Tensor
    hidden: torch.Tensor | None


class FrozenLM:
    """A frozen causal LM + template. Not an nn.Module on purpose: it is never handed to an optimizer.

    Args:
        path: model id or directory for ``from_pretrained``, or a ``.gguf`` file (dequantized on load).
        task: "rating" (answers "1".."5") or "ctr" (answers "Yes", "No").
        template: template id in TEMPLATES (default per task).
        prompt_length: l, the number of prompt vectors in the <UserID> slot.
        max_item_tokens / max_history_tokens: truncation of the per-row texts.
        fast: reuse the prefix's keys/values and apply only the answer rows of the output layer
            (module docstring); False runs the model's own full forward on every row.
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
        fast: bool = True,
    ):
        hf_logging.disable_progress_bar()
        self.task, self.path, self.prompt_length = task, path, prompt_length
        self.template = template or DEFAULT_TEMPLATE[task]
        if self.template not in TEMPLATES:
            raise PumaError(f"unknown template {self.template!r}; choose from {sorted(TEMPLATES)}")
        where, gguf = path, {}
        if path.endswith(".gguf"):  # dequantized on every load: `puma-ray models import` once is faster
            where, gguf = os.path.dirname(os.path.abspath(path)), {"gguf_file": os.path.basename(path)}
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(where, **gguf)
            self.model = AutoModelForCausalLM.from_pretrained(
                where, dtype=TORCH_DTYPES[dtype], attn_implementation=attn_implementation, **gguf
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
        self._tokens: dict[str, list[int]] = {}  # text -> token ids, each distinct text tokenized once
        segments = self._tokenize_template(TEMPLATES[self.template])
        self._full_segments = segments
        head = self.model.get_output_embeddings()
        self._answer_weight = head.weight.detach()[self.answer_ids]  # (n_answers, d)
        self._answer_bias = None if getattr(head, "bias", None) is None else head.bias.detach()[self.answer_ids]
        self._softcap = getattr(self.model.config.get_text_config(), "final_logit_softcapping", None)
        self._prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer (1, heads, P, head_dim)
        self.fast = False
        self._segments = segments
        if fast and isinstance(segments[0], list) and segments[1] == "<UserID>":
            self._use_fast_path(segments)

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

    def _use_fast_path(self, segments: list) -> None:
        """Cache the prefix's keys/values and switch to the answer-only head, if a probe row gives the
        same answer logits and prompt gradient as the model's own full forward (else keep the full one)."""
        probe_inputs = self.collate(["a"], [["b"]])
        prompt = torch.randn(1, self.prompt_length, self.hidden_size, generator=torch.Generator().manual_seed(0))
        reference = self._probe(prompt, probe_inputs)
        with torch.no_grad():
            ids = torch.tensor([segments[0]], device=self.device)
            cache = self.model.get_decoder()(input_ids=ids, use_cache=True).past_key_values
        self._prefix = [(layer.keys, layer.values) for layer in cache.layers]
        self._segments, self.fast = segments[1:], True
        fast = self._probe(prompt, self.collate(["a"], [["b"]]))
        tol = 1e-3 if self.model.dtype == torch.float32 else 3e-2
        if not all(torch.allclose(a, b, rtol=tol, atol=tol) for a, b in zip(fast, reference)):
            print(
                f"FrozenLM {self.path}: the cached prefix / answer-only head disagree with the model's full "
                "forward on a probe row; using the full forward",
                file=sys.stderr,
            )
            self._prefix, self._segments, self.fast = None, segments, False

    def _probe(self, prompt: torch.Tensor, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(answer logits, gradient of their sum into the prompt) of one row."""
        x = prompt.to(self.device, self.model.dtype).requires_grad_()
        logits = self.forward(x, inputs).answer_logits
        (grad,) = torch.autograd.grad(logits.sum(), x)
        return logits.detach().float(), grad.float()

    @property
    def prefix_length(self) -> int:
        """Tokens of the cached prefix (0 without the fast path)."""
        return self._prefix[0][0].shape[-2] if self._prefix else 0

    def token_ids(self, texts) -> list[list[int]]:
        """Token ids of each text, no special tokens; each distinct text is tokenized once per LM."""
        texts = [str(t) for t in texts]
        new = sorted({t for t in texts if t not in self._tokens})
        if new:
            self._tokens.update(zip(new, self.tokenizer(new, add_special_tokens=False)["input_ids"]))
        return [self._tokens[t] for t in texts]

    def _histories(self, history_text, n: int) -> list[str]:
        """CTR: each row's clicked titles joined, "none" when empty."""
        rows = history_text if history_text is not None else [None] * n
        return [" ; ".join(h) if h is not None and len(h) else "none" for h in rows]

    def row_lengths(self, item_text, history_text=None) -> list[int]:
        """Tokens per row (without a cached prefix): what padding is computed from."""
        return [len(r) for r in self._rows(item_text, history_text)[0]]

    def _rows(self, item_text, history_text=None) -> tuple[list[list[int]], list[int]]:
        """Per-row token ids (the template filled in, slots as pads) and where each <UserID> slot starts."""
        items = self.token_ids(item_text)
        hists = (
            self.token_ids(self._histories(history_text, len(items))) if "<ItemTitleList>" in self._segments else None
        )
        rows, starts = [], []
        for i, item in enumerate(items):
            ids: list[int] = []
            for seg in self._segments:
                if seg == "<UserID>":
                    starts.append(len(ids))
                    ids += [self.pad_id] * self.prompt_length
                elif seg == "<ItemTitle>":
                    ids += item[: self.max_item_tokens]
                elif seg == "<ItemTitleList>":
                    ids += hists[i][-self.max_history_tokens :]
                else:
                    ids += seg
            rows.append(ids)
        return rows, starts

    def collate(self, item_text, history_text=None) -> dict[str, torch.Tensor]:
        """Per-row texts -> left-padded model inputs (the cached prefix, if any, is not in them).

        Returns input_ids (B, T), attention_mask (B, T), position_ids (B, T) and
        user_pos (B, l): the positions the prompt vectors go to.
        """
        rows, starts = self._rows(item_text, history_text)
        T = max(map(len, rows))
        input_ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for i, ids in enumerate(rows):
            input_ids[i, T - len(ids) :] = torch.tensor(ids)
            mask[i, T - len(ids) :] = 1
        pads = T - torch.tensor([len(r) for r in rows])
        pos = (pads + torch.tensor(starts))[:, None] + torch.arange(self.prompt_length)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0) + self.prefix_length
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
        if not self.fast:
            out = self.model(
                inputs_embeds=emb,
                attention_mask=inputs["attention_mask"],
                position_ids=inputs["position_ids"],
                logits_to_keep=1,
                output_hidden_states=want_hidden,
                use_cache=False,
            )
            hidden = out.hidden_states[-1][:, -1, :].float() if want_hidden else None
            return LMOutput(answer_logits=out.logits[:, -1, :].float().index_select(-1, self.answer_ids), hidden=hidden)
        prefix = [(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)) for k, v in self._prefix]
        mask = torch.cat([inputs["attention_mask"].new_ones(B, self.prefix_length), inputs["attention_mask"]], 1)
        out = self.model.get_decoder()(
            inputs_embeds=emb,
            attention_mask=mask,
            position_ids=inputs["position_ids"],
            past_key_values=DynamicCache(prefix, config=self.model.config),
            use_cache=True,
        )
        hidden = out.last_hidden_state[:, -1, :]  # (B, d): normed, as the output layer sees it
        logits = F.linear(hidden, self._answer_weight, self._answer_bias)  # (B, n_answers)
        if self._softcap is not None:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return LMOutput(answer_logits=logits.float(), hidden=hidden.float() if want_hidden else None)
