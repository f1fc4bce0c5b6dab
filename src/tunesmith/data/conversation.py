"""The one shape every dataset format becomes: an optional system prompt and alternating user/assistant turns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class Turn:
    role: Literal["user", "assistant"]
    content: str


@dataclass
class Conversation:
    """``turns`` alternate user, assistant, ... and end with an assistant reply (formats.py guarantees it).

    ``system`` is None when the row has no system prompt (the template may then insert its default);
    ``source`` says where the row came from (``data/x.json:row 3``) so later errors can point at it.
    """

    turns: list[Turn] = field(default_factory=list)
    system: str | None = None
    source: str = ""

    def exchanges(self) -> list[tuple[str, str]]:
        """(user, assistant) content pairs, in order."""
        return [(self.turns[i].content, self.turns[i + 1].content) for i in range(0, len(self.turns) - 1, 2)]

    def to_messages(self, system: str | None = None) -> list[dict[str, str]]:
        """HF chat messages ([{role, content}]); ``system`` is used when the conversation has none."""
        sys_prompt = self.system if self.system is not None else system
        messages = [{"role": "system", "content": sys_prompt}] if sys_prompt is not None else []
        return messages + [{"role": turn.role, "content": turn.content} for turn in self.turns]
