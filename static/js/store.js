"use strict";

/*
 * Where conversations live. For now: this browser's localStorage, and every
 * question is a stateless `/chat` call that sends the whole history as
 * `messages`. When the server stores conversations (`message` +
 * `conversation_id`, `GET /chat/conversations`), only this module changes:
 * list/load/save/remove become fetches, requestBody() sends the new message
 * with the conversation_id, and started() records the id the server returns.
 * Every method that could touch the network already returns a Promise.
 *
 * A conversation is
 *   { id, title, createdAt, updatedAt,
 *     settings: { model, system, temperature, maxTokens },
 *     messages: [{ role, content, model?, usage?, finishReason?, stopped?, error? }] }
 * where `error` is { code, status, detail, retryAfter } so that it can be worded
 * again in another language.
 */
const Store = (() => {
  const CONVERSATIONS_KEY = "chatproxy.conversations.v1";
  const DEFAULTS_KEY = "chatproxy.defaultSettings";
  const TITLE_LENGTH = 60;

  const EMPTY_SETTINGS = { model: "", system: "", temperature: null, maxTokens: null };

  function read(key, fallback) {
    try {
      return JSON.parse(localStorage.getItem(key)) ?? fallback;
    } catch {
      return fallback;
    }
  }

  function write(key, value) {
    try {
      localStorage.setItem(key, JSON.stringify(value));
    } catch (error) {
      // Full or disabled storage: the page keeps working, it just forgets on reload.
      console.warn("Could not save to localStorage:", error.name);
    }
  }

  function newId() {
    // crypto.randomUUID exists only in secure contexts; plain http on a LAN is not one.
    return crypto.randomUUID?.() ?? Date.now().toString(36) + Math.random().toString(36).slice(2);
  }

  function titleFrom(messages) {
    const first = messages.find((message) => message.role === "user");
    const line = (first?.content || "").trim().split("\n")[0];
    return line.length > TITLE_LENGTH ? line.slice(0, TITLE_LENGTH - 1) + "…" : line;
  }

  /** Settings a new conversation starts with: the last ones the user chose. */
  function defaultSettings() {
    return { ...EMPTY_SETTINGS, ...read(DEFAULTS_KEY, {}) };
  }

  function rememberDefaults(settings) {
    write(DEFAULTS_KEY, settings);
  }

  /** A conversation that is not saved until its first message is sent. */
  function draft() {
    const now = Date.now();
    return { id: null, title: "", createdAt: now, updatedAt: now, settings: defaultSettings(), messages: [] };
  }

  /** Summaries {id, title, updatedAt}, most recently used first. */
  async function list() {
    return Object.values(read(CONVERSATIONS_KEY, {}))
      .map(({ id, title, updatedAt }) => ({ id, title, updatedAt }))
      .sort((a, b) => b.updatedAt - a.updatedAt);
  }

  async function load(id) {
    return read(CONVERSATIONS_KEY, {})[id] ?? null;
  }

  async function save(conversation) {
    conversation.id ||= newId();
    conversation.title ||= titleFrom(conversation.messages);
    conversation.updatedAt = Date.now();
    const all = read(CONVERSATIONS_KEY, {});
    all[conversation.id] = conversation;
    write(CONVERSATIONS_KEY, all);
    return conversation;
  }

  async function remove(id) {
    const all = read(CONVERSATIONS_KEY, {});
    delete all[id];
    write(CONVERSATIONS_KEY, all);
  }

  /** The JSON body of POST /chat that asks for the next assistant message. */
  function requestBody(conversation) {
    const { model, system, temperature, maxTokens } = conversation.settings;
    const body = {
      // Failed answers (empty content) are left out; stopped partial answers stay, as the user saw them.
      messages: conversation.messages
        .filter((message) => message.content)
        .map(({ role, content }) => ({ role, content })),
      stream: true,
    };
    if (model) body.model = model;
    if (system?.trim()) body.system = system.trim();
    if (temperature != null) body.temperature = temperature;
    if (maxTokens != null) body.max_tokens = maxTokens;
    return body;
  }

  /** The server's `start` event arrived; a server-side store would keep its conversation_id. */
  function started(_conversation, _start) {}

  return { draft, list, load, save, remove, requestBody, started, defaultSettings, rememberDefaults };
})();
