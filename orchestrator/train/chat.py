"""Conversations through a chat template, with the loss on assistant turns only.

No `{% generation %}` markers needed (few templates ship them): each assistant turn is found by rendering
the conversation prefix by prefix. With P = the messages before the turn plus the generation prompt and
Q = the messages through the turn, the turn's own text is Q minus P: its content and what the template
closes it with. The label mask covers that text up to and including its first special token (the
end-of-turn: `<|eot_id|>`, `<|im_end|>`, `</s>`), not the separator after it.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

from orchestrator.errors import PreflightError, first_line
from orchestrator.train.formats import IGNORE_INDEX

Render = Callable[[list, bool], str]  # (messages, add_generation_prompt) → text


class TemplateProblem(Exception):
    """The template cannot render a conversation, or not prefix by prefix."""


def template_text(chat_template: Optional[str], tokenizer, model_path: str) -> str:
    """data.chat_template (a Jinja string, or a file holding one), else the tokenizer's own template."""
    if chat_template is None:
        own = tokenizer.chat_template
        if isinstance(own, dict):  # several named templates: the default one
            own = own.get("default")
        if not own:
            raise PreflightError(f"data.chat_template: the tokenizer of {model_path} has no chat template; set "
                                 f"data.chat_template to a Jinja template or a file holding one")
        return own
    if "{{" in chat_template or "{%" in chat_template:
        return chat_template
    path = os.path.expanduser(chat_template)
    if not os.path.isfile(path):
        raise PreflightError(f"data.chat_template: {chat_template!r} is neither a Jinja template nor an existing file")
    with open(path, encoding="utf-8") as template:
        return template.read()


def renderer(tokenizer, template: str) -> Render:
    def render(messages: list, add_generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt)
        except Exception as error:  # jinja2 errors, the template's own raise_exception
            raise TemplateProblem(first_line(error, with_type=True)) from None
    return render


def conversation_segments(messages: list[dict], render: Render, train_on: str) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, trained) pieces: trained ones are assistant turns."""
    whole = render(messages, False)
    if train_on == "all":
        return [(whole, True)]
    turns = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    if train_on == "last_assistant":
        turns = turns[-1:]
    segments, done = [], 0
    for turn in turns:
        before = render(messages[:turn], True)
        through = render(messages[: turn + 1], False)
        if not (through.startswith(before) and whole.startswith(through) and len(before) >= done):
            raise TemplateProblem(f"it does not render the conversation up to message {turn + 1} as the start of the "
                                  f"whole, so the assistant turns cannot be found (data.train_on: all trains on "
                                  f"everything and needs no search)")
        segments += [(whole[done:len(before)], False), (whole[len(before):len(through)], True)]
        done = len(through)
    segments.append((whole[done:], False))
    return [segment for segment in segments if segment[0]]


class TemplateCheck:
    """The row rule's chat part: the template renders (prefix by prefix) a conversation of these roles.

    Checked once per sequence of roles, on its first row: what breaks a template is the structure (roles that
    do not alternate, a role it does not know), and checking every row would render a million conversations."""

    def __init__(self, render: Render, train_on: str):
        self.render, self.train_on = render, train_on
        self.verdicts: dict[tuple[str, ...], Optional[str]] = {}

    def __call__(self, messages: list[dict]) -> Optional[str]:
        roles = tuple(message["role"] for message in messages)
        if roles not in self.verdicts:
            try:
                conversation_segments(messages, self.render, self.train_on)
                verdict = None
            except TemplateProblem as problem:
                verdict = f"the chat template fails on a conversation of {', '.join(roles)}: {problem}"
            if len(self.verdicts) < 100_000:
                self.verdicts[roles] = verdict
            return verdict
        return self.verdicts[roles]


def special_ids(tokenizer) -> set[int]:
    """The ids of every special token: the named ones and added tokens marked special (`<|eot_id|>`, …)."""
    added = {index for index, token in tokenizer.added_tokens_decoder.items() if token.special}
    return added | set(tokenizer.all_special_ids)


def tokenize_conversations(conversations: list[list[dict]], rows: list[int], tokenizer, render: Render,
                           train_on: str, where: str) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids and labels of each conversation: assistant turns' content and end-of-turn token trained, the
    rest IGNORE_INDEX. Each piece is tokenized on its own, as at inference the reply follows the prompt's tokens."""
    pieces = []
    for messages, row in zip(conversations, rows):
        try:
            pieces.append(conversation_segments(messages, render, train_on))
        except TemplateProblem as problem:
            raise PreflightError(f"{where}: row {row}: the chat template fails on it: {problem}") from None
    texts = [text for segments in pieces for text, _ in segments]
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    special = special_ids(tokenizer)
    all_ids, all_labels = [], []
    for segments in pieces:
        ids, labels = [], []
        for _, trained in segments:
            piece = list(next(encoded))
            ids += piece
            if not trained:
                labels += [IGNORE_INDEX] * len(piece)
                continue
            end = len(piece) if train_on == "all" else next(
                (i + 1 for i, token in enumerate(piece) if token in special), len(piece))
            labels += piece[:end] + [IGNORE_INDEX] * (len(piece) - end)
        all_ids.append(ids)
        all_labels.append(labels)
    return all_ids, all_labels
