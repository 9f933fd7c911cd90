"""A frozen causal LM with a text template whose <UserID> slot takes l soft-prompt vectors.

A row is the template filled in: [lead | prefix | suffix], where
- the lead is the template's static text before its first slot (with the tokenizer's BOS),
- the prefix is the rest of what comes before the user's slot (item title, CTR history and
  static text between them; empty when the slot follows the lead, as in the paper's template),
- the suffix runs from the user's slot (l prompt vectors) to the answer position (the last token).
With a frozen LM nothing before the slot depends on the user. So on the fast path:
- the lead's keys and values are computed once per model and shared by every row;
- each distinct prefix token sequence is computed once, without gradient, and kept in an LRU
  cache (:class:`PrefixCache`, ``prefix_cache_mb`` per process) across batches; rows of a batch
  that share a prefix share one computation;
- each row runs forward (and backward into its prompt) over its suffix only, attending to its
  lead + prefix keys/values (left-padded inside the batch, masked);
- the output layer: only the answer tokens' rows of it are applied, at the answer position only
  (5 or 2 of a vocabulary of up to 262k), with the family's logit soft-capping where it has one.
So a row's cost follows the tokens from its slot on: with an item-first template (the item's
text before the slot, ``templates.BUILTIN``) a few tokens. Texts are tokenized once per distinct
text. All of it is checked against the model's own full forward on probe rows when the model
loads; a family where they disagree runs the full forward (and says so once, on stderr). A
batch longer than a sliding attention window runs the full forward too (said once).

Prompts are spliced into the output of ``get_input_embeddings()`` (never a family-specific
attribute); rows are left-padded so the answer position is the last one.
"""

from __future__ import annotations

import contextvars
import inspect
import os
import re
import sys
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.utils import logging as hf_logging

from puma_ray import templates
from puma_ray.errors import PumaError
from puma_ray.identity import model_fingerprint

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GROUPED = "puma_sdpa"  # the attention implementation name of :func:`grouped_attention`


# The cached lead + prefix keys/values of the batch a fast-path forward is running: (keys/values
# (layers, 2, B, Hkv, P, hd), mask (B, P) bool). Set around the decoder call rather than passed as a
# keyword, because not every family's decoder layer hands its keywords on to the attention.
PAST: contextvars.ContextVar = contextvars.ContextVar("puma_past", default=None)


def grouped_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The fast path's attention, registered with transformers as "puma_sdpa" (masks as for "sdpa");
    outside a fast-path forward (:data:`PAST` unset: the full forward, computing a prefix) it is
    plain "sdpa".

    query, key, value (B, H|Hkv, T, hd) of the T tokens of the suffixes; attention_mask (B, 1, T, T)
    bool or None (causal); the batch's :data:`PAST`: the cached lead + prefix of each row, which the
    suffix attends to first -> ((B, T, H, hd), None). The cached keys/values are never concatenated
    with the new ones, repeated per query head (each key/value head serves its H/Hkv query heads as
    one matmul) nor given a gradient: on CPU those copies cost more than the attention itself when
    T is a few tokens."""
    past = PAST.get()
    B, H, T, hd = query.shape
    Hkv = key.shape[1]
    plain = dropout or H % Hkv or any(kwargs.get(k) is not None for k in ("softcap", "s_aux", "position_bias"))
    if past is None or plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    kv, past_mask = past
    past_k, past_v = kv[module.layer_idx, 0], kv[module.layer_idx, 1]  # (B, Hkv, P, hd), no gradient
    P, g = past_k.shape[2], H // Hkv
    q = query.reshape(B, Hkv, g * T, hd)  # the query heads of one key/value head together
    scores = torch.cat([q @ past_k.transpose(-1, -2), q @ key.transpose(-1, -2)], -1)  # (B, Hkv, g*T, P+T)
    scores = scores.view(B, Hkv, g, T, P + T) * (scaling if scaling is not None else hd**-0.5)
    if attention_mask is None:  # causal over the new tokens
        attention_mask = torch.ones(T, T, dtype=torch.bool, device=query.device).tril().expand(B, 1, T, T)
    mask = torch.cat([past_mask[:, None, None, :].expand(B, 1, T, P), attention_mask.bool()], -1)
    # a finite floor, not -inf: a row with nothing to attend to (a pad) stays finite
    scores = scores.masked_fill(~mask[:, :, None], torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype).view(B, Hkv, g * T, P + T)
    out = probs[..., :P] @ past_v + probs[..., P:] @ value  # (B, Hkv, g*T, hd)
    return out.view(B, H, T, hd).transpose(1, 2).contiguous(), None


AttentionInterface.register(GROUPED, grouped_attention)
AttentionMaskInterface.register(GROUPED, sdpa_mask)


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


class PrefixCache:
    """Keys/values of row prefixes, one entry per distinct prefix token sequence, least recently
    used out first beyond ``max_bytes``. An entry: (layers, 2, kv_heads, tokens, head_dim), computed
    after the template's lead (its positions follow the lead's).

    ``rows`` counts the rows that asked for a prefix and ``computed`` those whose prefix was computed
    for them (not found here, nor computed for an earlier row of the same batch)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.rows = self.computed = self.evicted = 0

    def get(self, key: tuple) -> torch.Tensor | None:
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
        return entry

    def put(self, key: tuple, entry: torch.Tensor) -> None:
        size = entry.numel() * entry.element_size()
        if size > self.max_bytes:
            return
        self.entries[key] = entry
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
            self.evicted += 1

    def stats(self) -> dict:
        """{rows, computed, hit_rate (the share of rows whose prefix was not computed for them),
        entries, mb, evicted}."""
        return {
            "rows": self.rows,
            "computed": self.computed,
            "hit_rate": 1.0 - self.computed / self.rows if self.rows else float("nan"),
            "entries": len(self.entries),
            "mb": self.bytes / 2**20,
            "evicted": self.evicted,
        }


class FrozenLM:
    """A frozen causal LM + template. Not an nn.Module on purpose: it is never handed to an optimizer.

    Args:
        path: model id or directory for ``from_pretrained``, or a ``.gguf`` file (dequantized on load).
        task: "rating" (answers "1".."5") or "ctr" (answers "Yes", "No").
        template: a built-in template id or template text (``templates.resolve``; default per task).
        prompt_length: l, the number of prompt vectors in the <UserID> slot.
        max_item_tokens / max_history_tokens: truncation of the per-row texts.
        fast: compute each row from its user's slot on, over cached keys/values of what precedes
            it, and apply only the answer rows of the output layer (module docstring); False runs
            the model's own full forward on every whole row.
        prefix_cache_mb: memory for cached prefixes (keys/values), per process.
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
        prefix_cache_mb: float = 2048,
    ):
        hf_logging.disable_progress_bar()
        self.task, self.path, self.prompt_length = task, path, prompt_length
        self.template = templates.resolve(template, task)
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
        self.decoder = self.model.get_decoder()
        self.hidden_size = int(self.model.get_input_embeddings().embedding_dim)
        self.fingerprint = model_fingerprint(self.model.config)
        answers = ["1", "2", "3", "4", "5"] if task == "rating" else ["Yes", "No"]
        self.answer_ids = torch.tensor([answer_token_id(self.tokenizer, w) for w in answers], device=self.device)
        self.max_item_tokens, self.max_history_tokens = max_item_tokens, max_history_tokens
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._tokens: dict[str, list[int]] = {}  # text -> token ids, each distinct text tokenized once
        self._lead, self._mid, self._tail = self._split_template(self.template.text)
        head = self.model.get_output_embeddings()
        self._answer_weight = head.weight.detach()[self.answer_ids]  # (n_answers, d)
        self._answer_bias = None if getattr(head, "bias", None) is None else head.bias.detach()[self.answer_ids]
        self._softcap = getattr(self.model.config.get_text_config(), "final_logit_softcapping", None)
        text_config = self.model.config.get_text_config()
        layer_types = getattr(text_config, "layer_types", None) or ()
        sliding = getattr(text_config, "sliding_window", None)
        uses_window = sliding and (any("sliding" in t for t in layer_types) or not layer_types)
        self._window = int(sliding) if uses_window else None  # tokens a cached batch may span
        params = inspect.signature(self.decoder.forward).parameters
        # the decoder's cache argument: `cache` (every family here on transformers 5.25), `past_key_values` on
        # versions before the rename (5.25 accepts it with a FutureWarning, 5.40 removes it)
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.prefix_cache = PrefixCache(int(prefix_cache_mb * 2**20))
        self._lead_kv: torch.Tensor | None = None  # (layers, 2, 1, kv_heads, lead tokens, head_dim)
        self._buffer: torch.Tensor | None = None  # the batches' keys/values before their suffixes (_scratch)
        self._said: set[str] = set()
        self.fast = False
        if fast and attn_implementation != "sdpa":
            self._say("attention", f"the fast path runs on sdpa attention, not {attn_implementation}")
        elif fast:
            self._use_fast_path()

    @classmethod
    def from_config(cls, cfg, device: str | torch.device = "cpu") -> FrozenLM:
        """The LM a stage config names: ``cfg.model`` (path, dtype, attention, prefix cache),
        ``cfg.task``, ``cfg.template`` and ``cfg.prompt_length``."""
        m = cfg.model
        return cls(
            m.path,
            cfg.task,
            cfg.template,
            cfg.prompt_length,
            m.dtype,
            m.attn_implementation,
            device,
            prefix_cache_mb=m.prefix_cache_mb,
        )

    # --- the template ---------------------------------------------------------------------------

    def _split_template(self, text: str) -> tuple[list[int], list, list]:
        """Template text -> (lead token ids, prefix segments, suffix segments): a segment is a list
        of token ids (static text) or a slot name; the suffix starts at <UserID>. The lead holds the
        tokenizer's special start tokens (BOS) even when the template opens with a slot."""
        slots = "(" + "|".join(map(re.escape, templates.SLOTS)) + ")"
        parts = [p for p in re.split(slots, text) if p.strip()]
        segments: list = [
            p if p in templates.SLOTS else self.tokenizer.encode(p.strip(), add_special_tokens=False) for p in parts
        ]
        start = self.tokenizer.encode("", add_special_tokens=True)
        lead = start + (segments.pop(0) if segments and isinstance(segments[0], list) else [])
        user = segments.index(templates.USER)
        return lead, segments[:user], segments[user:]

    def _fill(self, segments: list, item: list[int], history: list[int] | None) -> tuple[list[int], int]:
        """Segments with one row's texts -> (token ids, where the <UserID> slot starts or -1); the
        slot holds l pad ids (the prompt vectors replace their embeddings)."""
        ids: list[int] = []
        start = -1
        for seg in segments:
            if seg == templates.USER:
                start = len(ids)
                ids += [self.pad_id] * self.prompt_length
            elif seg == templates.ITEM:
                ids += item[: self.max_item_tokens]
            elif seg == templates.HISTORY:
                ids += history[-self.max_history_tokens :]
            else:
                ids += seg
        return ids, start

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

    def _rows(self, item_text, history_text=None) -> tuple[list[list[int]], list[list[int]], list[int]]:
        """Per row: (prefix token ids, suffix token ids, where the <UserID> slot starts in the suffix)."""
        items = self.token_ids(item_text)
        hists = [None] * len(items)
        if templates.HISTORY in self._mid + self._tail:
            hists = self.token_ids(self._histories(history_text, len(items)))
        prefixes, suffixes, starts = [], [], []
        for item, hist in zip(items, hists):
            prefixes.append(self._fill(self._mid, item, hist)[0])
            suffix, start = self._fill(self._tail, item, hist)
            suffixes.append(suffix)
            starts.append(start)
        return prefixes, suffixes, starts

    def row_lengths(self, item_text, history_text=None) -> list[int]:
        """Tokens each row runs forward and backward through (the suffix on the fast path, else the
        whole row): what padding is computed from."""
        prefixes, suffixes, _ = self._rows(item_text, history_text)
        if self.fast:
            return [len(s) for s in suffixes]
        return [len(self._lead) + len(p) + len(s) for p, s in zip(prefixes, suffixes)]

    def collate(self, item_text, history_text=None) -> dict[str, torch.Tensor]:
        """Per-row texts -> left-padded model inputs.

        Returns input_ids (B, T), attention_mask (B, T), position_ids (B, T) and user_pos (B, l): the
        positions the prompt vectors go to. Fast path: T covers the suffixes only, and the prefixes
        come as prefix_ids / prefix_mask (B, V), left-padded; else T covers the whole rows.
        """
        prefixes, suffixes, starts = self._rows(item_text, history_text)
        starts = torch.tensor(starts)
        if not self.fast:
            suffixes = [self._lead + p + s for p, s in zip(prefixes, suffixes)]
            starts = starts + torch.tensor([len(self._lead) + len(p) for p in prefixes])
        input_ids, mask = _left_pad(suffixes, self.pad_id)
        pads = input_ids.shape[1] - mask.sum(-1)
        user_pos = (pads + starts)[:, None] + torch.arange(self.prompt_length)
        offset = 0
        out = {"input_ids": input_ids, "attention_mask": mask, "user_pos": user_pos}
        if self.fast:
            out["prefix_ids"], out["prefix_mask"] = _left_pad(prefixes, self.pad_id)
            offset = len(self._lead) + out["prefix_mask"].sum(-1, keepdim=True)
        out["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0) + offset
        return out

    # --- the forward pass -----------------------------------------------------------------------

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
        if self.fast and self._window is not None:
            span = len(self._lead) + inputs["prefix_ids"].shape[1] + inputs["input_ids"].shape[1]
            if span >= self._window:  # a sliding window would see the batch's padding as distance
                self._say("window", f"a batch spans {span} tokens >= the sliding window {self._window}")
                return self._full_forward(prompts, self._whole_rows(inputs), want_hidden)
        if not self.fast:
            return self._full_forward(prompts, inputs, want_hidden)
        emb = self._spliced(prompts, inputs)
        token = PAST.set(self._past(inputs["prefix_ids"], inputs["prefix_mask"]))  # read by grouped_attention
        try:
            out = self.decoder(
                inputs_embeds=emb,
                attention_mask=inputs["attention_mask"],
                position_ids=inputs["position_ids"],
                use_cache=False,
            )
        finally:
            PAST.reset(token)
        hidden = out.last_hidden_state[:, -1, :]  # (B, d): normed, as the output layer sees it
        logits = F.linear(hidden, self._answer_weight, self._answer_bias)  # (B, n_answers)
        if self._softcap is not None:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return LMOutput(answer_logits=logits.float(), hidden=hidden.float() if want_hidden else None)

    def _spliced(self, prompts: torch.Tensor, inputs: dict) -> torch.Tensor:
        """Token embeddings of input_ids (B, T, d) with the prompts (B, l, d) at user_pos."""
        B, l, d = prompts.shape
        emb = self.model.get_input_embeddings()(inputs["input_ids"])
        rows = torch.arange(B, device=self.device).repeat_interleave(l)
        return emb.index_put((rows, inputs["user_pos"].reshape(-1)), prompts.reshape(B * l, d).to(emb.dtype))

    def _full_forward(self, prompts: torch.Tensor, inputs: dict, want_hidden: bool) -> LMOutput:
        """The model's own forward over whole rows (the reference the fast path is checked against)."""
        out = self.model(
            inputs_embeds=self._spliced(prompts, inputs),
            attention_mask=inputs["attention_mask"],
            position_ids=inputs["position_ids"],
            logits_to_keep=1,
            output_hidden_states=want_hidden,
            use_cache=False,
        )
        hidden = out.hidden_states[-1][:, -1, :].float() if want_hidden else None
        return LMOutput(answer_logits=out.logits[:, -1, :].float().index_select(-1, self.answer_ids), hidden=hidden)

    def _whole_rows(self, inputs: dict) -> dict:
        """Fast-path inputs -> the same rows whole (lead + prefix + suffix), left-padded, for the full forward."""
        lead = torch.tensor(self._lead, dtype=torch.long, device=self.device)
        rows, starts = [], []
        for ids, mask, pids, pmask, pos in zip(
            inputs["input_ids"],
            inputs["attention_mask"],
            inputs["prefix_ids"],
            inputs["prefix_mask"],
            inputs["user_pos"],
        ):
            prefix = torch.cat([lead, pids[pmask.bool()]])
            rows.append(torch.cat([prefix, ids[mask.bool()]]).tolist())
            starts.append(len(prefix) + int(pos[0]) - int((mask == 0).sum()))
        input_ids, mask = _left_pad(rows, self.pad_id)
        pads = input_ids.shape[1] - mask.sum(-1)
        user_pos = (pads + torch.tensor(starts))[:, None] + torch.arange(self.prompt_length)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        whole = {"input_ids": input_ids, "attention_mask": mask, "user_pos": user_pos, "position_ids": position_ids}
        return {k: v.to(self.device) for k, v in whole.items()}

    # --- cached keys and values -----------------------------------------------------------------

    @torch.no_grad()
    def _run(self, ids: torch.Tensor, mask: torch.Tensor, past: torch.Tensor | None) -> torch.Tensor:
        """Keys/values of token rows ``ids`` (n, V), left-padded (``mask``), after ``past`` (layers, 2,
        n, heads, P, head_dim, all attended) -> (layers, 2, n, heads, P + V, head_dim)."""
        n = ids.shape[0]
        P = 0 if past is None else past.shape[-2]
        layers = None if past is None else [(k, v) for k, v in past]
        cache = DynamicCache(layers, config=self.model.config) if layers else DynamicCache(config=self.model.config)
        self.decoder(
            input_ids=ids.to(self.device),
            attention_mask=torch.cat([mask.new_ones(n, P), mask], 1).to(self.device),
            position_ids=((mask.cumsum(-1) - 1).clamp(min=0) + P).to(self.device),
            use_cache=True,
            **{self._cache_kw: cache},
        )
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        if len({(k.shape[1], k.shape[3]) for k, _ in kv}) != 1:
            raise PumaError(
                f"{self.path}: layers differ in key/value heads or width; the prefix cache needs them equal"
            )
        return torch.stack([torch.stack(pair) for pair in kv])

    def _past(self, prefix_ids: torch.Tensor, prefix_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's lead + prefix keys/values, left-padded in the batch -> ((layers, 2, B, heads, P,
        head_dim), (B, P) bool mask): the :data:`PAST` of :func:`grouped_attention`."""
        B, V = prefix_ids.shape
        lead = self._lead_kv
        P0 = lead.shape[-2]
        buf = self._scratch(B, P0 + V)
        buf[..., :P0, :] = lead
        if V:
            keys = [tuple(ids[m.bool()].tolist()) for ids, m in zip(prefix_ids, prefix_mask)]
            entries = {k: self.prefix_cache.get(k) for k in dict.fromkeys(keys)}
            missing = [k for k, e in entries.items() if e is None]
            self.prefix_cache.rows += B
            self.prefix_cache.computed += len(missing)
            for s in range(0, len(missing), 64):
                chunk = missing[s : s + 64]
                ids, mask = _left_pad([list(k) for k in chunk], self.pad_id)
                kv = self._run(ids, mask, lead.expand(-1, -1, len(chunk), -1, -1, -1))
                for j, k in enumerate(chunk):
                    entries[k] = kv[:, :, j, :, kv.shape[-2] - len(k) :].clone()
                    self.prefix_cache.put(k, entries[k])
            for i, k in enumerate(keys):
                buf[:, :, i, :, P0 + V - len(k) :] = entries[k]
        past_mask = torch.cat([prefix_mask.new_ones(B, P0), prefix_mask], 1).to(self.device).bool()
        return buf, past_mask

    def _scratch(self, B: int, P: int) -> torch.Tensor:
        """A contiguous (layers, 2, B, heads, P, head_dim) view of one buffer kept across batches: a
        new tensor per batch costs its page faults (as much as the copies into it, measured on CPU).
        Masked positions may hold an earlier batch's values: finite, and weighted 0."""
        L, _, _, heads, _, hd = self._lead_kv.shape
        n = L * 2 * B * heads * P * hd
        if self._buffer is None or self._buffer.numel() < n:
            self._buffer = self._lead_kv.new_zeros(n)
        return self._buffer[:n].view(L, 2, B, heads, P, hd)

    def _use_fast_path(self) -> None:
        """Compute the lead's keys/values and switch to the fast path, if probe rows (different
        prefix and suffix lengths, each run twice: computed, then from the cache) give the answer
        logits, last hidden state and prompt gradients of the model's own full forward; else keep
        the full forward and say so."""
        items, history = ["a", "b c d e"], [["b"], ["c d", "e"]]
        prompt = torch.randn(2, self.prompt_length, self.hidden_size, generator=torch.Generator().manual_seed(0))
        reference = self._probe(prompt, self.collate(items, history))
        lead = torch.tensor([self._lead])
        self._lead_kv = self._run(lead, torch.ones_like(lead), None)
        self.fast = True
        self.model.set_attn_implementation(GROUPED)  # sdpa, and grouped_attention for the fast path's calls
        tol = 1e-3 if self.model.dtype == torch.float32 else 3e-2
        for _ in range(2):
            got = self._probe(prompt, self.collate(items, history))
            if not all(torch.allclose(a, b, rtol=tol, atol=tol) for a, b in zip(got, reference)):
                self._say("probe", "the cached keys/values or the answer-only head disagree with its full forward")
                self._lead_kv, self.fast = None, False
                self.model.set_attn_implementation("sdpa")
                break
        self.prefix_cache = PrefixCache(self.prefix_cache.max_bytes)  # the probe's rows are not the data's

    def _probe(self, prompt: torch.Tensor, inputs: dict) -> tuple[torch.Tensor, ...]:
        """(answer logits, last hidden state, gradient of the logits' weighted sum into the prompt)."""
        x = prompt.to(self.device, self.model.dtype).requires_grad_()
        out = self.forward(x, inputs, want_hidden=True)
        weights = torch.arange(1, out.answer_logits.shape[1] + 1, device=self.device)
        (grad,) = torch.autograd.grad((out.answer_logits * weights).sum(), x)
        return out.answer_logits.detach().float(), out.hidden.detach().float(), grad.float()

    def _say(self, what: str, why: str) -> None:
        """One line on stderr, once per LM and kind, when a row takes the full forward."""
        if what not in self._said:
            self._said.add(what)
            print(f"FrozenLM {self.path}: {why}; using the model's full forward", file=sys.stderr)


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows -> (ids (B, T), mask (B, T)), left-padded to the longest (T may be 0)."""
    T = max(map(len, rows), default=0)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, T - len(r) :] = torch.tensor(r)
            mask[i, T - len(r) :] = 1
    return ids, mask
