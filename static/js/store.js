"use strict";

/*
 * Where conversations live: on the server (CONTRACT §3), so that they survive a
 * reload and are the same in every browser and device that uses the same
 * access token. A question is `POST /chat` with `message` and, after the
 * first turn, the `conversation_id` that the server's `start` event named;
 * the server keeps the history and sends it upstream itself.
 *
 * This browser's localStorage keeps only what the server does not:
 *  - the settings of each conversation (model, temperature, max tokens),
 *    keyed by its id, and the settings a new conversation starts with
 *    (system prompt included: the server fixes it when a conversation starts);
 *  - notes on answers written in this browser (model, token usage, finish
 *    reason, stopped by the user), keyed by conversation id and a hash of the
 *    answer's text, since the server returns neither usage nor its messages'
 *    ids with a streamed answer. Another browser shows the same answers
 *    without these notes.
 *
 * A conversation in the page is
 *   { id, title, system, model,
 *     settings: { model, system, temperature, maxTokens },
 *     messages: [{ role, content, stored, partial?, model?, usage?, finishReason?, stopped?, error? }] }
 * where `stored` says whether the server has the message (a question refused
 * before its answer began is not stored) and `error` is
 * { code, status, detail, retryAfter } so that it can be worded again in another language.
 */
const Store = (() => {
  const DEFAULTS_KEY = "chatproxy.defaultSettings";
  const LOCAL_PREFIX = "chatproxy.conversation.";
  const PAGE_SIZE = 30;
  const MAX_PAGE = 200; // the server's largest `limit`
  const TITLE_LENGTH = 60;

  const EMPTY_SETTINGS = { model: "", system: "", temperature: null, maxTokens: null };

  // --- localStorage -------------------------------------------------------------

  function read(key, fallback) {
    try {
      return JSON.parse(localStorage.getItem(key)) ?? fallback;
    } catch {
      return fallback;
    }
  }

  function write(key, value) {
    try {
      if (value == null) localStorage.removeItem(key);
      else localStorage.setItem(key, JSON.stringify(value));
    } catch (error) {
      // Full or disabled storage: the page keeps working, it just forgets these notes on reload.
      console.warn("Could not save to localStorage:", error.name);
    }
  }

  /** What this browser keeps about conversation `id`: { settings, answers }. */
  function local(id) {
    const kept = read(LOCAL_PREFIX + id, {});
    return { settings: kept.settings || {}, answers: kept.answers || {} };
  }

  function writeLocal(id, kept) {
    write(LOCAL_PREFIX + id, kept);
  }

  /** A short, stable fingerprint of an answer's text (FNV-1a, 32 bits, and the length). */
  function fingerprint(text) {
    let hash = 0x811c9dc5;
    for (let i = 0; i < text.length; i++) {
      hash ^= text.charCodeAt(i);
      hash = Math.imul(hash, 0x01000193) >>> 0;
    }
    return `${text.length}:${hash.toString(36)}`;
  }

  /** Settings a new conversation starts with: the last ones the user chose. */
  function defaultSettings() {
    return { ...EMPTY_SETTINGS, ...read(DEFAULTS_KEY, {}) };
  }

  function rememberDefaults(settings) {
    write(DEFAULTS_KEY, settings);
  }

  /** Keep a stored conversation's own settings; its system prompt is the server's. */
  function saveSettings(conversation) {
    if (!conversation.id) return;
    const kept = local(conversation.id);
    const { model, temperature, maxTokens } = conversation.settings;
    kept.settings = { model, temperature, maxTokens };
    writeLocal(conversation.id, kept);
  }

  /** Keep what the server does not return about a finished or stopped answer. */
  function rememberAnswer(conversation, message) {
    if (!conversation.id || !message.content) return;
    const note = {};
    if (message.model) note.model = message.model;
    if (message.usage) note.usage = message.usage;
    if (message.finishReason) note.finishReason = message.finishReason;
    if (message.stopped) note.stopped = true;
    if (!Object.keys(note).length) return;
    const kept = local(conversation.id);
    kept.answers[fingerprint(message.content)] = note;
    writeLocal(conversation.id, kept);
  }

  function forget(id) {
    write(LOCAL_PREFIX + id, null);
  }

  // --- the server ---------------------------------------------------------------

  /** The JSON of a successful call, null for 204; an Api.ApiError otherwise. */
  async function call(path, options = {}) {
    const response = await Api.request(path, options);
    if (!response.ok) throw await Api.errorFrom(response);
    return response.status === 204 ? null : response.json();
  }

  const path = (id) => `/chat/conversations/${encodeURIComponent(id)}`;

  function summary(item) {
    return {
      id: String(item.id),
      title: String(item.title ?? ""),
      model: item.model ?? "",
      updatedAt: item.updated_at,
      messageCount: item.message_count,
    };
  }

  /**
   * One page of the client's conversations, newest first: { items, more }.
   * `before` is the id of the last conversation already shown; `limit` lets
   * a refresh fetch again as many as are shown.
   */
  async function list({ before = null, limit = PAGE_SIZE } = {}) {
    limit = Math.min(MAX_PAGE, Math.max(1, limit));
    const query = new URLSearchParams({ limit: String(limit) });
    if (before) query.set("before", before);
    const { data = [] } = await call(`/chat/conversations?${query}`);
    return { items: data.map(summary), more: data.length === limit };
  }

  /** A stored conversation with its messages, and this browser's notes on them. */
  async function load(id) {
    const stored = await call(path(id));
    const kept = local(stored.id);
    // No model named (""): the server goes on with the conversation's own (`stored.model`).
    const settings = { ...EMPTY_SETTINGS, ...kept.settings, system: stored.system || "" };
    const messages = (stored.messages || [])
      .filter((message) => message.role === "user" || message.role === "assistant")
      .map((message) => {
        const shown = { role: message.role, content: String(message.content ?? ""), stored: true };
        if (message.role === "assistant") {
          if (message.partial) shown.partial = true;
          Object.assign(shown, kept.answers[fingerprint(shown.content)] || {});
        }
        return shown;
      });
    return {
      id: stored.id,
      title: stored.title || "",
      system: stored.system || "",
      model: stored.model || "",
      settings,
      messages,
    };
  }

  /** PATCH the title; resolves with the server's summary. */
  async function rename(id, title) {
    const body = JSON.stringify({ title });
    return summary(await call(path(id), { method: "PATCH", headers: { "Content-Type": "application/json" }, body }));
  }

  /** DELETE it on the server (for every device), and this browser's notes. Already gone counts as done. */
  async function remove(id) {
    try {
      await call(path(id), { method: "DELETE" });
    } catch (error) {
      if (error.code !== "conversation_not_found") throw error;
    }
    forget(id);
  }

  /** The client's usage today (UTC): the `total` of GET /usage?days=1. */
  async function usageToday() {
    const { total } = await call("/usage?days=1");
    return total;
  }

  // --- asking -------------------------------------------------------------------

  function titleFrom(text) {
    const line = text.trim().split("\n")[0];
    return line.length > TITLE_LENGTH ? line.slice(0, TITLE_LENGTH - 1) + "…" : line;
  }

  /** A conversation that exists only in the page until its first answer starts. */
  function draft() {
    return { id: null, title: "", system: "", model: "", settings: defaultSettings(), messages: [] };
  }

  /** The JSON body of POST /chat that asks `text` as the next turn of `conversation`. */
  function requestBody(conversation, text) {
    const { model, system, temperature, maxTokens } = conversation.settings;
    const body = { message: text, stream: true };
    if (conversation.id) body.conversation_id = conversation.id;
    else if (system?.trim()) body.system = system.trim(); // the server keeps it with the new conversation
    if (model) body.model = model;
    if (temperature != null) body.temperature = temperature;
    if (maxTokens != null) body.max_tokens = maxTokens;
    return body;
  }

  /** The `start` event arrived: a new conversation now has the server's id. */
  function started(conversation, start) {
    if (conversation.id || !start?.conversation_id) return;
    conversation.id = String(start.conversation_id);
    conversation.title ||= titleFrom(conversation.messages.find((m) => m.role === "user")?.content || "");
    conversation.system = conversation.settings.system?.trim() || "";
    conversation.model = start.model || "";
    saveSettings(conversation);
  }

  return {
    PAGE_SIZE,
    draft,
    list,
    load,
    rename,
    remove,
    usageToday,
    requestBody,
    started,
    saveSettings,
    rememberAnswer,
    defaultSettings,
    rememberDefaults,
  };
})();
