"""Fitting stored history into a model's context window, for English and Chinese alike."""

from __future__ import annotations

import pytest

from app.services.context import (
    DEFAULT_CONTEXT_WINDOW,
    SAFETY,
    context_window,
    estimate_message_tokens,
    estimate_prompt_tokens,
    estimate_tokens,
    fit,
)

ENGLISH = "The quick brown fox jumps over the lazy dog. "  # 45 characters
CHINESE = "敏捷的棕色狐狸跳过了那只懒狗。"  # 15 characters, full-width stop included


def _conversation(turns: int, text: str, system: str | None = "You are helpful.") -> list[dict]:
    messages = [{"role": "system", "content": system}] if system else []
    for n in range(turns):
        messages.append({"role": "user", "content": f"Q{n}: {text}"})
        messages.append({"role": "assistant", "content": f"A{n}: {text}"})
    messages.append({"role": "user", "content": f"Q{turns}: the newest question"})
    return messages


def _fits(messages: list[dict], model: str, reserve: int) -> bool:
    return estimate_prompt_tokens(messages) <= (context_window(model) - reserve) * SAFETY


@pytest.mark.parametrize(
    ("model", "window"),
    [
        ("gpt-4o", 128_000),
        ("gpt-4o-mini-2024-07-18", 128_000),
        ("gpt-4.1-nano", 1_047_576),
        ("gpt-4", 8_192),
        ("gpt-4-0613", 8_192),
        ("gpt-4-turbo-2024-04-09", 128_000),
        ("gpt-3.5-turbo", 16_385),
        ("o1-mini", 128_000),
        ("o3-mini", 200_000),
        ("o4-mini", 200_000),
        ("deepseek-chat", 65_536),
        ("llama3.1:8b", 131_072),
        ("meta-llama/Llama-3.1-8B-Instruct", 131_072),
        ("llama3", 8_192),
        ("Qwen/Qwen2.5-7B-Instruct", 32_768),
        ("qwen-plus", 131_072),
        ("my-own-finetune", DEFAULT_CONTEXT_WINDOW),
        ("", DEFAULT_CONTEXT_WINDOW),
    ],
)
def test_known_models_have_their_context_window_and_others_a_default(model, window):
    assert context_window(model) == window


def test_english_counts_about_a_token_per_four_characters():
    assert estimate_tokens("") == 0
    assert estimate_tokens("abcd") == 1
    assert estimate_tokens("abcde") == 2
    # Real tokenizers give 10 tokens for this sentence; the estimate is within 20%.
    assert 8 <= estimate_tokens(ENGLISH.strip()) <= 12


def test_chinese_counts_a_token_per_character():
    assert estimate_tokens(CHINESE) == 15
    assert estimate_tokens("日本語とひらがな、カタカナ") == 13
    assert estimate_tokens("한국어") == 3
    # Mixed text: each script by its own rule.
    assert estimate_tokens("Hello 世界") == 2 + 2  # "Hello " is 6 characters → 2


def test_a_message_costs_its_text_and_framing():
    assert estimate_message_tokens({"role": "user", "content": "abcd"}) == 1 + 4
    parts = {"role": "user", "content": [{"type": "text", "text": "abcd"}, {"type": "image_url"}]}
    assert estimate_message_tokens(parts) > 100  # an image is not free


def test_a_conversation_that_fits_is_sent_whole():
    messages = _conversation(3, ENGLISH)
    assert fit(messages, "gpt-4o", 1000) == messages


@pytest.mark.parametrize("text", [ENGLISH * 20, CHINESE * 20], ids=["english", "chinese"])
def test_the_oldest_turns_are_dropped_whole_to_fit(text):
    messages = _conversation(40, text)
    assert not _fits(messages, "gpt-4", 1024)

    fitted = fit(messages, "gpt-4", 1024)

    assert _fits(fitted, "gpt-4", 1024)
    assert fitted[0] == messages[0]  # the system prompt
    assert fitted[-1] == messages[-1]  # the newest question
    # What remains is the newest turns, each question with its answer.
    assert fitted[1:] == messages[len(messages) - len(fitted) + 1 :]
    assert fitted[1]["role"] == "user"
    assert 2 < len(fitted) < len(messages)
    # Nearly all the room is used: only turns that would not fit were dropped.
    one_more = [messages[0], *messages[len(messages) - len(fitted) - 1 :]]
    assert not _fits(one_more, "gpt-4", 1024)


def test_chinese_history_keeps_fewer_turns_than_english_of_the_same_length():
    # The same number of characters is about four times the tokens in Chinese.
    english = fit(_conversation(40, "abcdefghijklmno" * 20), "gpt-4", 1024)
    chinese = fit(_conversation(40, CHINESE * 20), "gpt-4", 1024)
    assert len(chinese) < len(english) / 2


def test_every_system_message_is_kept():
    messages = _conversation(40, ENGLISH * 20)
    messages.insert(5, {"role": "system", "content": "Answer in French from now on."})
    fitted = fit(messages, "gpt-4", 1024)
    assert [m for m in fitted if m["role"] == "system"] == [messages[0], messages[5]]


def test_the_newest_question_is_kept_even_when_it_alone_is_too_big():
    messages = _conversation(3, ENGLISH)
    messages[-1] = {"role": "user", "content": CHINESE * 1000}  # 15,000 tokens
    assert fit(messages, "gpt-4", 1024) == [messages[0], messages[-1]]


def test_a_partial_answer_after_the_newest_question_stays_with_it():
    messages = _conversation(40, ENGLISH * 20)
    messages.append({"role": "assistant", "content": "Once upon a"})
    fitted = fit(messages, "gpt-4", 1024)
    assert fitted[-2:] == messages[-2:]


def test_tool_calls_and_their_results_go_with_their_turn():
    tool_turn = [
        {"role": "user", "content": "Weather in Paris? " + ENGLISH * 40},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1"}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18°C"},
        {"role": "assistant", "content": "It is 18°C."},
    ]
    messages = [*tool_turn * 8, {"role": "user", "content": "And tomorrow?"}]
    fitted = fit(messages, "gpt-4", 1024)
    assert (len(fitted) - 1) % len(tool_turn) == 0
    assert fitted[0]["role"] == "user" and fitted[-1] == messages[-1]


def test_a_bigger_answer_reserve_keeps_less_history():
    messages = _conversation(40, ENGLISH * 20)
    assert len(fit(messages, "gpt-4", 4096)) < len(fit(messages, "gpt-4", 256))


def test_nothing_to_fit():
    assert fit([], "gpt-4o", 1000) == []
    only_system = [{"role": "system", "content": "hi"}]
    assert fit(only_system, "gpt-4o", 1000) == only_system
