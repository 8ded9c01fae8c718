"""A turn of a stored conversation: its history to the upstream, its answer into storage.

The upstream receives the stored history (with the conversation's system prompt), trimmed from
the oldest turns to fit the model's context. Nothing is stored until the upstream has accepted
the turn, so a refused request leaves the conversation as it was; once it has, the question
and whatever was generated — all of it, or the part before a failure or before the client
left, marked partial — are stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import ApiError
from ..settings import Settings
from .completions import ChatRequest, ChatService, ChatStream, Completion
from .context import DEFAULT_ANSWER_RESERVE, fit
from .conversations import Conversations, prompt_messages, title_from

ENDPOINT = "/chat"


@dataclass(frozen=True)
class Turn:
    message: str
    conversation_id: str | None = None
    system: str | None = None  # for a new conversation only
    model: str | None = None  # None: the conversation's model, else the default
    options: dict[str, Any] = field(default_factory=dict)


class ConversationChat:
    def __init__(self, settings: Settings, chat: ChatService, conversations: Conversations):
        self.settings = settings
        self.chat = chat
        self.conversations = conversations

    def reply(self, client: str, turn: Turn) -> tuple[str, Completion]:
        conversation, request = self._request(client, turn)
        completion = self.chat.complete(request, client, ENDPOINT)
        conversation_id = self._store_question(client, turn, conversation, request.model)
        self.conversations.add_message(
            client,
            conversation_id,
            "assistant",
            completion.content,
            model=completion.model,
            usage=completion.usage,
        )
        return conversation_id, completion

    def reply_stream(self, client: str, turn: Turn) -> tuple[str, ChatStream]:
        conversation, request = self._request(client, turn)
        stream = self.chat.stream(request, client, ENDPOINT)
        try:
            conversation_id = self._store_question(client, turn, conversation, request.model)
        except BaseException:
            stream.close()
            raise

        def store_answer(ended: ChatStream) -> None:
            if not (ended.text or ended.finished):
                return
            try:
                self.conversations.add_message(
                    client,
                    conversation_id,
                    "assistant",
                    ended.text,
                    partial=not ended.finished,
                    model=ended.model,
                    usage=ended.usage,
                )
            except ApiError as exc:  # deleted while its answer was streaming: nothing to keep
                if exc.code != "conversation_not_found":
                    raise

        stream.on_close(store_answer)
        return conversation_id, stream

    def _request(self, client: str, turn: Turn) -> tuple[dict | None, ChatRequest]:
        """The stored conversation being continued (None for a new one) and the upstream call."""
        if turn.conversation_id:
            conversation = self.conversations.get(client, turn.conversation_id)
            history = prompt_messages(conversation)
            model = turn.model or conversation["model"] or self.settings.default_model
        else:
            conversation = None
            system = turn.system or self.settings.system_prompt
            history = [{"role": "system", "content": system}] if system else []
            model = turn.model or self.settings.default_model
        if not self.settings.model_allowed(model):
            raise ApiError(
                "model_not_allowed", f"The model '{model}' is not allowed on this server."
            )
        reserve = turn.options.get("max_tokens") or DEFAULT_ANSWER_RESERVE
        messages = fit([*history, {"role": "user", "content": turn.message}], model, reserve)
        return conversation, ChatRequest(messages=list(messages), model=model, options=turn.options)

    def _store_question(
        self, client: str, turn: Turn, conversation: dict | None, model: str
    ) -> str:
        """Stores the turn's question: a new conversation and its question in one transaction."""
        if conversation is None:
            return self.conversations.create(
                client,
                title=title_from(turn.message),
                system=turn.system or self.settings.system_prompt or None,
                model=model,
                question=turn.message,
            )["id"]
        self.conversations.add_message(client, conversation["id"], "user", turn.message)
        return conversation["id"]
