"""LangChain messages <-> the plain {"role", "content"} dicts d2l-memory logs and prompts with."""

from __future__ import annotations

import json
from collections.abc import Sequence

from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)

# The chat-template roles of the LangChain message types.
_ROLES: dict[type[BaseMessage], str] = {
    HumanMessage: "user",
    AIMessage: "assistant",
    SystemMessage: "system",
    ToolMessage: "tool",
    FunctionMessage: "tool",
}


def role_of(message: BaseMessage) -> str:
    if isinstance(message, ChatMessage):
        return message.role
    for cls, role in _ROLES.items():
        if isinstance(message, cls):
            return role
    raise ValueError(f"cannot map a {type(message).__name__} to a chat role")


def text_of(message: BaseMessage) -> str:
    """The message's text blocks; an assistant's tool calls are written out so memory keeps them."""
    text = str(message.text)
    if isinstance(message, AIMessage) and message.tool_calls:
        calls = [f"[called {c['name']}({json.dumps(c['args'], sort_keys=True)})]" for c in message.tool_calls]
        text = "\n".join(([text] if text else []) + calls)
    return text


def to_dict(message: BaseMessage) -> dict[str, str]:
    return {"role": role_of(message), "content": text_of(message)}


def to_dicts(messages: Sequence[BaseMessage]) -> list[dict[str, str]]:
    return [to_dict(m) for m in messages]


def from_dict(message: dict[str, str]) -> BaseMessage:
    """Back to LangChain types; roles without a LangChain class (e.g. ``tool``, whose call id is not
    logged) come back as ChatMessage."""
    role, content = message["role"], message["content"]
    if role == "user":
        return HumanMessage(content)
    if role == "assistant":
        return AIMessage(content)
    if role == "system":
        return SystemMessage(content)
    return ChatMessage(content=content, role=role)


def split_question(messages: Sequence[BaseMessage]) -> tuple[list[dict[str, str]], str]:
    """The conversation as prompt history plus the final human question the model answers."""
    if not messages:
        raise ValueError("ChatD2L needs at least one message")
    last = messages[-1]
    if role_of(last) != "user":
        raise ValueError(
            f"ChatD2L answers the last human message, but the conversation ends with a {type(last).__name__}; "
            "end the message list with a HumanMessage"
        )
    return to_dicts(messages[:-1]), text_of(last)
