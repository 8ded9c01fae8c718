"use strict";

/*
 * What both pages need to talk to the server: a fetch wrapper that adds the
 * access token and asks for one on 401, readers for streamed text and
 * server-sent events, and the words to show for each failure (CONTRACT §4).
 */
const Api = (() => {
  const TOKEN_KEY = "chatproxy.accessToken";
  const MAX_TOKEN_PROMPTS = 3;

  // Set by the templates from request.script_root, so the pages keep working
  // when the app is mounted under a path prefix behind a reverse proxy.
  const root = (document.body?.dataset.root || "").replace(/\/$/, "");

  /** A failed call, in the shape of the contract's error body plus the HTTP details. */
  class ApiError extends Error {
    constructor({ status = 0, code = "", type = "", message = "", retryAfter = null } = {}) {
      super(message || code || `HTTP ${status}`);
      this.name = "ApiError";
      this.status = status;
      this.code = code;
      this.type = type;
      this.detail = message;
      this.retryAfter = retryAfter;
    }
  }

  // --- access token --------------------------------------------------------

  let memoryToken = ""; // used only when localStorage is unavailable

  function getToken() {
    try {
      return localStorage.getItem(TOKEN_KEY) || "";
    } catch {
      return memoryToken;
    }
  }

  function setToken(token) {
    try {
      if (token) localStorage.setItem(TOKEN_KEY, token);
      else localStorage.removeItem(TOKEN_KEY);
    } catch {
      // Storage disabled: the token lasts until the page is closed.
      memoryToken = token || "";
    }
  }

  /** The in-page dialog that asks for the token; built on first use so both pages share it. */
  const tokenDialog = (() => {
    let dialog = null;
    let resolveAnswer = null;

    function element(tag, attributes = {}, children = []) {
      const node = document.createElement(tag);
      for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
      node.append(...children);
      return node;
    }

    function build() {
      const input = element("input", {
        id: "token-input",
        name: "token",
        type: "password",
        autocomplete: "off",
        spellcheck: "false",
        required: "",
      });
      const form = element("form", { method: "dialog", class: "token-form" }, [
        element("h2", { id: "token-dialog-title", "data-i18n": "token.title" }),
        element("p", { id: "token-dialog-text", "data-i18n": "token.text" }),
        element("p", { id: "token-dialog-refused", class: "form-error", "data-i18n": "token.refused", hidden: "" }),
        element("label", { for: "token-input", "data-i18n": "token.label" }),
        input,
        element("div", { class: "dialog-actions" }, [
          element("button", { id: "token-cancel", type: "button", class: "button", "data-i18n": "token.cancel" }),
          element("button", { id: "token-submit", type: "submit", class: "button button--primary", "data-i18n": "token.submit" }),
        ]),
      ]);
      dialog = element("dialog", { id: "token-dialog", class: "dialog", "aria-labelledby": "token-dialog-title" }, [form]);
      document.body.append(dialog);
      I18n.apply(dialog);

      form.addEventListener("submit", (event) => {
        event.preventDefault();
        const token = input.value.trim();
        if (token) finish(token);
      });
      dialog.querySelector("#token-cancel").addEventListener("click", () => finish(null));
      // Esc closes a modal dialog with a "cancel" event.
      dialog.addEventListener("cancel", (event) => {
        event.preventDefault();
        finish(null);
      });
    }

    function finish(token) {
      dialog.close();
      resolveAnswer?.(token);
      resolveAnswer = null;
    }

    /** Resolves with the token typed in, or null when the user cancels. */
    function ask(refused) {
      if (!dialog) build();
      dialog.querySelector("#token-dialog-refused").hidden = !refused;
      const input = dialog.querySelector("#token-input");
      input.value = "";
      dialog.showModal();
      input.focus();
      return new Promise((resolve) => {
        resolveAnswer = resolve;
      });
    }

    return { ask };
  })();

  // Several calls may hit 401 at once (say, the model list and a question): one dialog serves all.
  let pendingAsk = null;
  function askForToken(refused) {
    pendingAsk ??= tokenDialog.ask(refused).finally(() => {
      pendingAsk = null;
    });
    return pendingAsk;
  }

  // --- requests ------------------------------------------------------------

  /**
   * fetch(root + path) with the stored access token. On 401 the user is asked
   * for a token and the call is repeated, so options.body must be a string.
   * Resolves with the Response whatever its status; rejects with an AbortError
   * when options.signal aborts, or an ApiError with code "network_error".
   */
  async function request(path, options = {}) {
    for (let attempt = 0; ; attempt++) {
      const token = getToken();
      const headers = new Headers(options.headers || {});
      if (token) headers.set("Authorization", `Bearer ${token}`);

      let response;
      try {
        response = await fetch(root + path, { ...options, headers });
      } catch (error) {
        if (error.name === "AbortError") throw error;
        throw new ApiError({ code: "network_error", message: error.message });
      }
      if (response.status !== 401 || attempt >= MAX_TOKEN_PROMPTS) return response;

      // The page makes several calls at once: another one may have got a new token meanwhile.
      const current = getToken();
      if (current && current !== token) continue;
      if (token) setToken(""); // refused: do not send it again
      const fresh = await askForToken(Boolean(token));
      if (!fresh) return response;
      setToken(fresh);
    }
  }

  /** Seconds from a Retry-After header (delta-seconds or an HTTP date), or null. */
  function parseRetryAfter(value) {
    if (!value) return null;
    const seconds = /^\s*\d+\s*$/.test(value) ? Number(value) : (Date.parse(value) - Date.now()) / 1000;
    return Number.isFinite(seconds) ? Math.max(0, Math.ceil(seconds)) : null;
  }

  const CODE_FOR_STATUS = {
    401: "invalid_access_token",
    413: "request_too_large",
    429: "rate_limit_exceeded",
    504: "upstream_timeout",
  };

  /** An ApiError from a non-2xx response: a JSON {"error": {…}} body, or the text endpoints' "error: …" line. */
  async function errorFrom(response) {
    const text = await response.text().catch(() => "");
    let info;
    try {
      const body = JSON.parse(text);
      info = typeof body.error === "object" && body.error ? body.error : { message: String(body.error ?? "") };
    } catch {
      info = { message: text.trim().replace(/^error:\s*/i, "") };
    }
    return new ApiError({
      status: response.status,
      code: info.code || CODE_FOR_STATUS[response.status] || "",
      type: info.type || "",
      message: info.message || "",
      retryAfter: parseRetryAfter(response.headers.get("Retry-After")),
    });
  }

  /** An ApiError from the data of an SSE `error` event. */
  function errorFromEvent(data) {
    const info = data?.error || {};
    return new ApiError({
      status: 0,
      code: info.code || "",
      type: info.type || "",
      message: info.message || "",
      retryAfter: null,
    });
  }

  /** The failure in plain words, in the page's language. */
  function describe(error) {
    const t = I18n.t;
    switch (error.code) {
      case "rate_limit_exceeded":
      case "upstream_rate_limited":
        return error.retryAfter != null
          ? t("error.rateLimitedIn", { seconds: error.retryAfter })
          : t("error.rateLimited");
      case "budget_exceeded":
        return t("error.budget");
      case "upstream_unreachable":
        return t("error.unreachable");
      case "upstream_timeout":
        return t("error.timeout");
      case "upstream_bad_response":
        return t("error.badResponse");
      case "upstream_auth_failed":
        return t("error.upstreamAuth");
      case "upstream_not_configured":
        return t("error.notConfigured");
      case "invalid_access_token":
        return t("error.token");
      case "model_not_allowed":
        return t("error.modelNotAllowed");
      case "context_length_exceeded":
        return t("error.tooLong");
      case "request_too_large":
        return t("error.tooLarge");
      case "network_error":
        return t("error.network");
      case "stream_interrupted":
        return t("error.cutOff");
      case "conversation_not_found":
        return t("error.conversationGone");
      default:
        return error.detail || (error.status ? t("error.http", { status: error.status }) : t("error.network"));
    }
  }

  // --- streams -------------------------------------------------------------

  /** Call onText with each decoded piece of the body as it arrives. */
  async function readText(response, onText) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder(); // stream mode keeps a multi-byte character split across reads whole
    try {
      for (;;) {
        let chunk;
        try {
          chunk = await reader.read();
        } catch (error) {
          if (error.name === "AbortError") throw error;
          throw new ApiError({ code: "stream_interrupted", message: error.message });
        }
        if (chunk.done) break;
        const text = decoder.decode(chunk.value, { stream: true });
        if (text) onText(text);
      }
      const rest = decoder.decode();
      if (rest) onText(rest);
    } catch (error) {
      reader.cancel().catch(() => {});
      throw error;
    }
  }

  /**
   * An incremental parser for text/event-stream (the WHATWG rules): events may be
   * split anywhere across reads, lines end in \n, \r\n or \r, lines starting
   * with ":" (the server's `: ping` heartbeats) are comments, and an event
   * without data is not dispatched.
   */
  class SSEParser {
    constructor(onEvent) {
      this.onEvent = onEvent;
      this.pending = "";
      this.type = "";
      this.data = [];
    }

    feed(text) {
      let buffered = this.pending + text;
      // A trailing \r may be the first half of \r\n: wait for the next read to tell.
      const heldBack = buffered.endsWith("\r") ? "\r" : "";
      if (heldBack) buffered = buffered.slice(0, -1);
      const lines = buffered.split(/\r\n|\r|\n/);
      this.pending = lines.pop() + heldBack;
      lines.forEach((line) => this.line(line));
    }

    /** The stream ended: per the spec an unterminated last event is dropped. */
    end() {
      this.pending = "";
      this.type = "";
      this.data = [];
    }

    line(line) {
      if (line === "") {
        if (this.data.length) this.onEvent({ event: this.type || "message", data: this.data.join("\n") });
        this.type = "";
        this.data = [];
        return;
      }
      if (line.startsWith(":")) return;
      const colon = line.indexOf(":");
      const field = colon === -1 ? line : line.slice(0, colon);
      let value = colon === -1 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") this.type = value;
      else if (field === "data") this.data.push(value);
      // "id" and "retry" only matter to EventSource reconnection, which fetch does not do.
    }
  }

  /** Call onEvent({event, data}) for each server-sent event of the response. */
  async function readEvents(response, onEvent) {
    const parser = new SSEParser(onEvent);
    await readText(response, (text) => parser.feed(text));
    parser.end();
  }

  return {
    ApiError,
    SSEParser,
    request,
    errorFrom,
    errorFromEvent,
    describe,
    readText,
    readEvents,
    getToken,
    setToken,
  };
})();
