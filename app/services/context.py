"""Fitting a conversation into a model's context window.

A stored conversation grows without end; the upstream refuses a request whose messages and
answer exceed the model's window. `fit` drops the oldest turns whole until the rest fits,
keeping the system messages and the newest user message whatever happens.

Token counts are estimated, without tiktoken (whose vocabularies are downloaded at run time and
which knows nothing of non-OpenAI models): a CJK character (Han, kana, Hangul, and full-width
punctuation) counts one token, any other text one token per four characters, and each message
four tokens of framing. This is a rule of thumb, not a tokenizer. By the usual published ratios,
English prose lands within about ±20% of OpenAI's counts; Chinese is over-counted for
o200k_base models (gpt-4o, gpt-4.1, o-series: ~0.7-1 token per Hanzi) and under-counted by up to
a third for cl100k_base ones (gpt-4, gpt-3.5-turbo: 1-1.5); code, URLs and long numbers can take
1.5x the estimate. `fit` therefore fills only `SAFETY` of the room it computes, the answer's reserve
absorbs the rest, and the upstream remains the judge of the exact count.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

DEFAULT_CONTEXT_WINDOW = 8_192
DEFAULT_ANSWER_RESERVE = 1_024
MESSAGE_OVERHEAD = 4  # role and delimiters around every message
REPLY_PRIMING = 3  # the assistant header the upstream adds for its answer
IMAGE_TOKENS = 765  # a 1024x1024 image at high detail
SAFETY = 0.9
SYSTEM_ROLES = frozenset({"system", "developer"})

# Context windows in tokens, by model-name prefix (the longest matching prefix wins). Names are
# matched in lower case, after any `vendor/` prefix (`meta-llama/Llama-3.1-8B` → `llama-3.1-8b`).
CONTEXT_WINDOWS: Mapping[str, int] = {
    "gpt-5": 400_000,
    "gpt-4.1": 1_047_576,
    "gpt-4.5": 128_000,
    "gpt-4o": 128_000,
    "chatgpt-4o": 128_000,
    "gpt-4-turbo": 128_000,
    "gpt-4-1106": 128_000,
    "gpt-4-0125": 128_000,
    "gpt-4-vision": 128_000,
    "gpt-4-32k": 32_768,
    "gpt-4": 8_192,
    "gpt-3.5-turbo": 16_385,
    "gpt-3.5-turbo-instruct": 4_096,
    "o1": 200_000,
    "o1-mini": 128_000,
    "o1-preview": 128_000,
    "o3": 200_000,
    "o4-mini": 200_000,
    "deepseek-": 65_536,
    "llama-2": 4_096,
    "llama2": 4_096,
    "llama-3": 8_192,
    "llama3": 8_192,
    "llama-3.1": 131_072,
    "llama3.1": 131_072,
    "llama-3.2": 131_072,
    "llama3.2": 131_072,
    "llama-3.3": 131_072,
    "llama3.3": 131_072,
    "llama-4": 131_072,
    "llama4": 131_072,
    "qwen": 32_768,
    "qwen-turbo": 131_072,
    "qwen-plus": 131_072,
    "qwen-max": 32_768,
    "mistral": 32_768,
    "mixtral": 32_768,
    "gemma": 8_192,
    "gemma2": 8_192,
    "gemma3": 131_072,
    "phi3": 4_096,
    "claude": 200_000,
    "gemini": 1_048_576,
}

# Scripts written without spaces, where a tokenizer spends about one token per character.
_CJK = re.compile(
    "["
    "\u1100-\u11ff"  # Hangul Jamo
    "\u2e80-\u2fdf"  # CJK radicals
    "\u3000-\u303f"  # CJK symbols and punctuation
    "\u3040-\u30ff"  # Hiragana, Katakana
    "\u3100-\u31ff"  # Bopomofo, Hangul compatibility Jamo, Katakana extensions
    "\u3400-\u4dbf"  # CJK Extension A
    "\u4e00-\u9fff"  # CJK Unified Ideographs
    "\uac00-\ud7af"  # Hangul syllables
    "\uf900-\ufaff"  # CJK compatibility ideographs
    "\ufe30-\ufe4f"  # CJK compatibility forms
    "\uff00-\uffef"  # half- and full-width forms
    "\U00020000-\U0003ffff"  # CJK Extensions B and later
    "]"
)


def context_window(model: str) -> int:
    """The context window of `model` in tokens, `DEFAULT_CONTEXT_WINDOW` when unknown."""
    name = model.strip().lower().rsplit("/", 1)[-1]
    best = ""
    for prefix in CONTEXT_WINDOWS:
        if name.startswith(prefix) and len(prefix) > len(best):
            best = prefix
    return CONTEXT_WINDOWS[best] if best else DEFAULT_CONTEXT_WINDOW


def estimate_tokens(text: str) -> int:
    """Tokens in `text`: one per CJK character, one per four characters of anything else."""
    if not text:
        return 0
    cjk = len(_CJK.findall(text))
    return cjk + math.ceil((len(text) - cjk) / 4)


def estimate_message_tokens(message: Mapping[str, Any]) -> int:
    """Tokens one chat message costs in a prompt, framing included."""
    tokens = MESSAGE_OVERHEAD + estimate_tokens(str(message.get("name") or ""))
    content = message.get("content")
    if isinstance(content, str):
        tokens += estimate_tokens(content)
    elif isinstance(content, list):  # content parts: text, images, audio …
        for part in content:
            if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                tokens += estimate_tokens(part["text"])
            else:
                tokens += IMAGE_TOKENS
    for call in message.get("tool_calls") or ():
        tokens += estimate_tokens(str(call))
    return tokens


def estimate_prompt_tokens(messages: Iterable[Mapping[str, Any]]) -> int:
    """Tokens a list of chat messages costs as a prompt."""
    return REPLY_PRIMING + sum(estimate_message_tokens(message) for message in messages)


def fit(
    messages: Sequence[Mapping[str, Any]],
    model: str,
    reserve_for_answer: int = DEFAULT_ANSWER_RESERVE,
) -> list[Mapping[str, Any]]:
    """The messages to send so that the prompt and an answer of `reserve_for_answer` tokens fit
    the model's window.

    System messages are always kept. The others form turns, each a user message and what
    followed it (the answer, tool calls and their results); the oldest turns are dropped whole
    until the rest fits. The newest turn is always kept, cut to its user message if even that
    is too much; a prompt that still does not fit goes as it is and the upstream says so.
    """
    room = int((context_window(model) - max(reserve_for_answer, 0)) * SAFETY) - REPLY_PRIMING
    system = {i for i, message in enumerate(messages) if message.get("role") in SYSTEM_ROLES}
    turns = _turns([i for i in range(len(messages)) if i not in system], messages)
    if not turns:
        return list(messages)
    room -= sum(estimate_message_tokens(messages[i]) for i in system)

    kept: list[list[int]] = []
    for turn in reversed(turns):
        cost = sum(estimate_message_tokens(messages[i]) for i in turn)
        if kept and cost > room:
            break
        if not kept and cost > room:  # the newest turn alone is too big: its question stays
            turn = [i for i in turn if messages[i].get("role") == "user"][-1:] or turn[:1]
            cost = sum(estimate_message_tokens(messages[i]) for i in turn)
        kept.append(turn)
        room -= cost
    keep = system.union(*kept)
    return [message for i, message in enumerate(messages) if i in keep]


def _turns(indices: list[int], messages: Sequence[Mapping[str, Any]]) -> list[list[int]]:
    """`indices` split before each user message."""
    turns: list[list[int]] = []
    for i in indices:
        if messages[i].get("role") == "user" or not turns:
            turns.append([])
        turns[-1].append(i)
    return turns
