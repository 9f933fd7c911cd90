"""Prompt templates: the text a user's soft prompt is spliced into. A light module (no torch).

A template is text with slots: ``<UserID>`` (the user's l prompt vectors; exactly once),
``<ItemTitle>`` (the item's text; exactly once) and ``<ItemTitleList>`` (a CTR row's recently
clicked titles; at most once). The answer is read at the template's last token.

Built-in templates, by id:

- ``rating_v1`` / ``ctr_v1`` (the defaults): the method paper's wording, user slot first.
- ``rating_item_first`` / ``ctr_item_first``: the same words, reordered so that everything that
  does not depend on the user (the question, the item, the click history) comes BEFORE the user's
  slot. With a frozen LM that prefix is the same for every user who meets the item, so
  ``FrozenLM`` computes it once per distinct text and each row pays only for the few tokens from
  the slot on (" . Answer:").

A config's ``template`` is a built-in id or the user's own template text (recognised by its slots);
it is checked when the config loads. A prompt store records its template (id or text) and the hash
of the text (:attr:`Template.hash`); prompts trained under one template are refused under another
unless the config says ``allow_template_change: true``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from puma_ray.errors import PumaError

USER, ITEM, HISTORY = "<UserID>", "<ItemTitle>", "<ItemTitleList>"
SLOTS = (USER, ITEM, HISTORY)
# each slot's allowed number of occurrences in a template
SLOT_COUNTS = {USER: (1, 1), ITEM: (1, 1), HISTORY: (0, 1)}

BUILTIN = {
    "rating_v1": (
        "We have information about the user's preferences encoded in the feature <UserID> . "
        "Predict the user's rating (an integer between 1 and 5) for the item <ItemTitle> . Answer:"
    ),
    "rating_item_first": (
        "Predict the user's rating (an integer between 1 and 5) for the item <ItemTitle> . "
        "We have information about the user's preferences encoded in the feature <UserID> . Answer:"
    ),
    "ctr_v1": (
        "We have information about the user's preferences encoded in the feature <UserID> . "
        "The user recently clicked: <ItemTitleList> . Will the user click the news <ItemTitle> ? "
        "Answer Yes or No. Answer:"
    ),
    "ctr_item_first": (
        "The user recently clicked: <ItemTitleList> . Will the user click the news <ItemTitle> ? "
        "Answer Yes or No. We have information about the user's preferences encoded in the feature <UserID> . "
        "Answer:"
    ),
}
DEFAULT = {"rating": "rating_v1", "ctr": "ctr_v1"}
CUSTOM = "custom"  # the name of a template given as text


@dataclass(frozen=True)
class Template:
    """A resolved template: ``name`` (a built-in id, or "custom") and its ``text``."""

    name: str
    text: str

    @property
    def hash(self) -> str:
        """sha256 of the text, 16 hex digits: what a prompt store records and stages compare."""
        return text_hash(self.text)

    @property
    def spec(self) -> str:
        """What a config or a prompt store names it by: the id of a built-in, else the text itself."""
        return self.text if self.name == CUSTOM else self.name


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def spec_hash(spec: str) -> str:
    """The text hash of a template named as a config or store names it (a built-in id, or text)."""
    return text_hash(BUILTIN.get(spec, spec))


def is_text(spec: str) -> bool:
    """A template given as text (it has a slot, or spaces) rather than as a built-in id."""
    return "<" in spec or " " in spec.strip()


def check_text(text: str) -> str:
    """The template text if its slots are right, else PumaError naming the problem (one line)."""
    unknown = sorted({s for s in re.findall(r"<[A-Za-z][A-Za-z0-9_]*>", text) if s not in SLOTS})
    if unknown:
        raise PumaError(f"template: unknown slot(s) {', '.join(unknown)}; the slots are {', '.join(SLOTS)}")
    for slot, (low, high) in SLOT_COUNTS.items():
        n = text.count(slot)
        if not low <= n <= high:
            times = "exactly once" if low == high else f"at most {high} time(s)"
            raise PumaError(f"template: {slot} appears {n} time(s); it must appear {times}")
    return text


def resolve(spec: str | None, task: str) -> Template:
    """A config's ``template`` (None: the task's default; a built-in id; or template text) -> Template."""
    spec = spec or DEFAULT[task]
    if is_text(spec):
        return Template(CUSTOM, check_text(spec))
    if spec not in BUILTIN:
        raise PumaError(
            f"template {spec!r}: not a built-in id ({', '.join(sorted(BUILTIN))}) nor template text with slots"
        )
    if not spec.startswith(f"{task}_"):
        raise PumaError(f"template {spec!r} is for another task than {task!r}")
    return Template(spec, BUILTIN[spec])


def check_same(have_spec: str, have_hash: str, where: str, want: Template, allow: bool, hint: str) -> None:
    """Refuse (one line) prompts trained under the template ``have_spec`` (text hash ``have_hash``;
    a store's record, found at ``where``) used under ``want``, unless ``allow``; ``hint`` names the
    setting that allows it."""
    if allow or have_hash == want.hash:
        return
    have = Template(CUSTOM if is_text(have_spec) else have_spec, have_spec)
    raise PumaError(
        f"{where}: prompts were trained under template {short(have, have_hash)} and this run uses "
        f"{short(want, want.hash)}; set {hint}=true to use them anyway"
    )


def short(t: Template, hash_: str) -> str:
    """A template's name for messages: the id, or "custom (<hash>)"."""
    return t.name if t.name != CUSTOM else f"custom ({hash_})"
