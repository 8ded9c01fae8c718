"use strict";

/*
 * The chat page.
 *
 * Plain DOM code rather than Vue: the page's CSP (script-src 'self', no
 * 'unsafe-eval') rules out Vue's in-browser template compiler, and Vue's
 * runtime-only build would mean hand-written render functions, which are
 * longer than the few functions below that build each message. A streaming
 * answer is also simplest as one element whose content is replaced with
 * freshly sanitised Markdown, without a virtual DOM diffing it.
 *
 * Modules (classic `defer` scripts, loaded in order): I18n (strings), Api
 * (fetch, token dialog, SSE), Store (where conversations live), Markdown
 * (safe rendering). This file only wires them to the page.
 */
(() => {
  const CURRENT_KEY = "chatproxy.currentConversation";
  const COPIED_FOR_MS = 1500;

  const $ = (id) => document.getElementById(id);
  const ui = {
    layout: $("layout"),
    sidebar: $("sidebar"),
    backdrop: $("sidebar-backdrop"),
    sidebarToggle: $("sidebar-toggle"),
    newChat: $("new-chat"),
    conversationList: $("conversation-list"),
    conversationEmpty: $("conversation-empty"),
    title: $("conversation-title"),
    exportButton: $("export-button"),
    settingsToggle: $("settings-toggle"),
    settingsPanel: $("settings-panel"),
    model: $("setting-model"),
    modelsError: $("models-error"),
    preset: $("setting-preset"),
    system: $("setting-system"),
    temperature: $("setting-temperature"),
    maxTokens: $("setting-max-tokens"),
    messages: $("messages"),
    composer: $("composer"),
    question: $("question"),
    send: $("send-button"),
    stop: $("stop-button"),
    editBanner: $("edit-banner"),
    cancelEdit: $("cancel-edit"),
  };

  const PRESETS = ["concise", "translator", "coder", "teacher"];

  let conversation = Store.draft();
  let streaming = null; // { conversation, assistant, controller, element } while an answer is being written
  let editing = false; // the composer holds the last question, to replace it when sent
  let modelsLoaded = false;

  // --- small helpers ---------------------------------------------------------

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text != null) node.textContent = text;
    return node;
  }

  function button(className, label) {
    const node = element("button", "message-action " + className, label);
    node.type = "button";
    return node;
  }

  function remember(key, value) {
    try {
      if (value) localStorage.setItem(key, value);
      else localStorage.removeItem(key);
    } catch {
      // Not remembered across visits; nothing else depends on it.
    }
  }

  async function copyText(text) {
    try {
      await navigator.clipboard.writeText(text);
      return true;
    } catch {
      // navigator.clipboard needs a secure context; plain http on a LAN is not one.
      const area = element("textarea", "offscreen");
      area.value = text;
      area.setAttribute("readonly", "");
      document.body.append(area);
      area.select();
      const copied = document.execCommand("copy");
      area.remove();
      return copied;
    }
  }

  async function copyWithFeedback(target, text) {
    if (!(await copyText(text))) return;
    const label = target.textContent;
    target.textContent = I18n.t("chat.copied");
    target.classList.add("is-done");
    setTimeout(() => {
      target.textContent = label;
      target.classList.remove("is-done");
    }, COPIED_FOR_MS);
  }

  function lastIndexOf(role) {
    for (let i = conversation.messages.length - 1; i >= 0; i--) {
      if (conversation.messages[i].role === role) return i;
    }
    return -1;
  }

  function isNearBottom() {
    const { scrollHeight, scrollTop, clientHeight } = ui.messages;
    return scrollHeight - scrollTop - clientHeight < 80;
  }

  function scrollToBottom() {
    ui.messages.scrollTop = ui.messages.scrollHeight;
  }

  // --- rendering -------------------------------------------------------------

  function usageText(message) {
    const parts = [];
    if (message.model) parts.push(message.model);
    const usage = message.usage;
    if (usage && usage.total_tokens != null) {
      parts.push(
        I18n.t("chat.usage", {
          prompt: usage.prompt_tokens ?? "?",
          completion: usage.completion_tokens ?? "?",
          total: usage.total_tokens,
        }),
      );
    }
    return parts.join(" · ");
  }

  function userMessageElement(message, isLastQuestion) {
    const article = element("article", "message message--user");
    article.append(element("h3", "visually-hidden", I18n.t("chat.you")));
    article.append(element("div", "message-body", message.content)); // the user's own text, shown as typed
    if (isLastQuestion && !streaming) {
      const actions = element("div", "message-actions");
      actions.append(button("edit-message", I18n.t("chat.edit")));
      article.append(actions);
    }
    return article;
  }

  function assistantMessageElement(message, isLast) {
    const article = element("article", "message message--assistant");
    const live = streaming?.assistant === message;
    if (live) article.setAttribute("aria-busy", "true");
    article.append(element("h3", "visually-hidden", I18n.t("chat.assistant")));

    const body = element("div", "message-body markdown");
    if (message.content) Markdown.render(body, message.content, { final: !live });
    else if (live) body.append(element("span", "typing", "")); // dots until the first delta
    article.append(body);

    if (message.error) {
      const error = element("p", "message-error", Api.describe(message.error));
      article.append(error);
    }
    const notes = [];
    if (message.stopped) notes.push(I18n.t("chat.stopped"));
    if (message.finishReason === "length") notes.push(I18n.t("chat.finishLength"));
    if (notes.length) article.append(element("p", "message-note", notes.join(" ")));

    const footer = element("div", "message-footer");
    footer.append(element("span", "message-usage", usageText(message)));
    if (!live) {
      const actions = element("div", "message-actions");
      if (message.content) actions.append(button("copy-answer", I18n.t("chat.copy")));
      if (isLast) actions.append(button("regenerate", I18n.t("chat.regenerate")));
      footer.append(actions);
    }
    article.append(footer);
    return article;
  }

  function renderMessages() {
    const { messages } = conversation;
    const lastQuestion = lastIndexOf("user");
    ui.messages.replaceChildren();
    if (!messages.length) {
      ui.messages.append(element("p", "messages-empty", I18n.t("chat.empty")));
      return;
    }
    messages.forEach((message, index) => {
      const node =
        message.role === "user"
          ? userMessageElement(message, index === lastQuestion)
          : assistantMessageElement(message, index === messages.length - 1);
      node.dataset.index = index;
      if (streaming?.assistant === message) streaming.element = node;
      ui.messages.append(node);
    });
  }

  function renderTitle() {
    ui.title.textContent = conversation.title || I18n.t("chat.newTitle");
    ui.exportButton.disabled = !conversation.messages.length;
  }

  async function renderSidebar() {
    const summaries = await Store.list();
    ui.conversationList.replaceChildren(
      ...summaries.map((summary) => {
        const item = element("li", "conversation-item");
        const open = element("button", "conversation-open", summary.title || I18n.t("chat.newTitle"));
        open.type = "button";
        open.dataset.id = summary.id;
        if (summary.id === conversation.id) open.setAttribute("aria-current", "true");
        const remove = element("button", "conversation-delete icon-button");
        remove.type = "button";
        remove.dataset.id = summary.id;
        remove.setAttribute("aria-label", I18n.t("sidebar.delete", { title: summary.title }));
        remove.title = remove.getAttribute("aria-label");
        const cross = element("span", "", "×");
        cross.setAttribute("aria-hidden", "true");
        remove.append(cross);
        item.append(open, remove);
        return item;
      }),
    );
    ui.conversationEmpty.hidden = summaries.length > 0;
  }

  function renderSettings() {
    const { model, system, temperature, maxTokens } = conversation.settings;
    if (model && ![...ui.model.options].some((option) => option.value === model)) {
      ui.model.append(new Option(model, model));
    }
    ui.model.value = model || "";
    ui.system.value = system || "";
    ui.temperature.value = temperature ?? "";
    ui.maxTokens.value = maxTokens ?? "";
    ui.preset.value = presetFor(system || "");
  }

  function renderComposer() {
    ui.send.hidden = Boolean(streaming);
    ui.stop.hidden = !streaming;
    ui.editBanner.hidden = !editing;
  }

  function renderAll() {
    renderTitle();
    renderSettings();
    renderMessages();
    renderComposer();
    renderSidebar();
  }

  // While an answer streams, only its body is redrawn, at most once a frame.
  let frameRequested = false;
  function scheduleStreamRender() {
    if (frameRequested) return;
    frameRequested = true;
    requestAnimationFrame(() => {
      frameRequested = false;
      if (!streaming?.element || streaming.conversation !== conversation) return;
      const follow = isNearBottom();
      const body = streaming.element.querySelector(".message-body");
      Markdown.render(body, streaming.assistant.content, { final: false });
      if (follow) scrollToBottom();
    });
  }

  // --- conversations ---------------------------------------------------------

  async function openConversation(id) {
    stop();
    const loaded = id ? await Store.load(id) : null;
    conversation = loaded || Store.draft();
    remember(CURRENT_KEY, conversation.id);
    cancelEdit();
    renderAll();
    scrollToBottom();
    closeSidebar();
  }

  async function removeConversation(id) {
    if (streaming?.conversation.id === id) {
      streaming.conversation.removed = true; // so the stopped stream does not save it again
      stop();
    }
    await Store.remove(id);
    if (conversation.id === id) await openConversation(null);
    else renderSidebar();
  }

  // --- asking ----------------------------------------------------------------

  async function send() {
    const text = ui.question.value.trim();
    if (!text || streaming) return;
    if (editing) {
      // Replace the last question and everything after it.
      conversation.messages.length = Math.max(0, lastIndexOf("user"));
      editing = false;
    }
    conversation.messages.push({ role: "user", content: text });
    ui.question.value = "";
    await Store.save(conversation);
    remember(CURRENT_KEY, conversation.id);
    renderTitle();
    renderSidebar();
    await generate();
  }

  /** Ask for the next assistant message of the current conversation and stream it in. */
  async function generate() {
    const target = conversation;
    const assistant = { role: "assistant", content: "" };
    const body = Store.requestBody(target); // before the empty answer joins the history
    target.messages.push(assistant);
    streaming = { conversation: target, assistant, controller: new AbortController(), element: null };
    renderMessages();
    renderComposer();
    scrollToBottom();

    let finished = false;
    try {
      const response = await Api.request("/chat", {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
        body: JSON.stringify(body),
        signal: streaming.controller.signal,
      });
      if (!response.ok) throw await Api.errorFrom(response);
      await Api.readEvents(response, ({ event, data }) => {
        let payload;
        try {
          payload = JSON.parse(data);
        } catch {
          return; // not one of ours
        }
        if (event === "start") {
          assistant.model = payload.model;
          Store.started(target, payload);
        } else if (event === "delta") {
          assistant.content += payload.content ?? "";
          scheduleStreamRender();
        } else if (event === "done") {
          assistant.usage = payload.usage;
          assistant.finishReason = payload.finish_reason;
          finished = true;
        } else if (event === "error") {
          throw Api.errorFromEvent(payload);
        }
      });
      if (!finished) throw new Api.ApiError({ code: "stream_interrupted" });
    } catch (error) {
      if (error.name === "AbortError") {
        assistant.stopped = true;
      } else {
        assistant.error = { code: error.code, status: error.status, detail: error.detail, retryAfter: error.retryAfter };
      }
    } finally {
      streaming = null;
      if (!target.removed) await Store.save(target);
      renderComposer();
      if (target === conversation) {
        const follow = isNearBottom();
        renderMessages();
        if (follow) scrollToBottom();
        if (assistant.error) ui.messages.lastElementChild?.querySelector(".message-error")?.setAttribute("role", "alert");
      }
      renderSidebar();
    }
  }

  function stop() {
    streaming?.controller.abort();
  }

  function regenerate() {
    if (streaming) return;
    const last = conversation.messages.at(-1);
    if (last?.role === "assistant") conversation.messages.pop();
    if (conversation.messages.at(-1)?.role === "user") generate();
  }

  function startEdit() {
    const index = lastIndexOf("user");
    if (index === -1 || streaming) return;
    editing = true;
    ui.question.value = conversation.messages[index].content;
    renderComposer();
    ui.question.focus();
    ui.question.setSelectionRange(ui.question.value.length, ui.question.value.length);
  }

  function cancelEdit() {
    if (!editing) return;
    editing = false;
    ui.question.value = "";
    renderComposer();
  }

  // --- settings --------------------------------------------------------------

  function presetFor(system) {
    if (!system.trim()) return "none";
    return PRESETS.find((name) => I18n.t(`preset.${name}.text`) === system) || "custom";
  }

  function numberOrNull(input, parse, min, max) {
    const value = parse(input.value);
    if (!Number.isFinite(value)) return null;
    return Math.min(max, Math.max(min, value));
  }

  async function saveSettings() {
    const settings = conversation.settings;
    settings.model = ui.model.value;
    settings.system = ui.system.value;
    settings.temperature = numberOrNull(ui.temperature, parseFloat, 0, 2);
    settings.maxTokens = numberOrNull(ui.maxTokens, (v) => parseInt(v, 10), 1, 1e7);
    Store.rememberDefaults(settings);
    if (conversation.id) await Store.save(conversation);
  }

  async function loadModels() {
    if (modelsLoaded) return;
    try {
      const response = await Api.request("/v1/models");
      if (!response.ok) throw await Api.errorFrom(response);
      const { data = [] } = await response.json();
      const ids = data.map((model) => String(model.id)).sort();
      ui.model.replaceChildren(ui.model.options[0], ...ids.map((id) => new Option(id, id)));
      modelsLoaded = true;
      ui.modelsError.hidden = true;
      renderSettings(); // re-selects the conversation's model (added back if the server no longer lists it)
    } catch (error) {
      ui.modelsError.hidden = false;
      ui.modelsError.textContent = `${I18n.t("settings.modelsFailed")} ${error.name === "ApiError" ? Api.describe(error) : ""}`;
    }
  }

  function toggleSettings() {
    const show = ui.settingsPanel.hidden;
    ui.settingsPanel.hidden = !show;
    ui.settingsToggle.setAttribute("aria-expanded", String(show));
    if (show) loadModels();
  }

  // --- export ----------------------------------------------------------------

  function exportMarkdown() {
    if (!conversation.messages.length) return;
    const title = conversation.title || I18n.t("chat.newTitle");
    const lines = [`# ${title}`, ""];
    if (conversation.settings.system) lines.push(`> ${conversation.settings.system.replace(/\n/g, "\n> ")}`, "");
    for (const message of conversation.messages) {
      lines.push(`## ${I18n.t(message.role === "user" ? "chat.you" : "chat.assistant")}`, "");
      if (message.content) lines.push(message.content, "");
      if (message.error) lines.push(`_${Api.describe(message.error)}_`, "");
      const usage = message.role === "assistant" ? usageText(message) : "";
      if (usage) lines.push(`_${usage}_`, "");
    }
    const blob = new Blob([lines.join("\n")], { type: "text/markdown;charset=utf-8" });
    const link = element("a", "offscreen");
    link.href = URL.createObjectURL(blob);
    link.download = (title.replace(/[\\/:*?"<>|\u0000-\u001f]+/g, " ").trim().slice(0, 80) || "conversation") + ".md";
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 0);
  }

  // --- sidebar (a drawer on narrow screens) ----------------------------------

  function setSidebar(open) {
    ui.layout.classList.toggle("is-sidebar-open", open);
    ui.backdrop.hidden = !open;
    ui.sidebarToggle.setAttribute("aria-expanded", String(open));
  }

  function openSidebar() {
    setSidebar(true);
    ui.newChat.focus();
  }

  function closeSidebar() {
    if (!ui.layout.classList.contains("is-sidebar-open")) return;
    setSidebar(false);
    if (ui.sidebar.contains(document.activeElement)) ui.sidebarToggle.focus();
  }

  // --- events ----------------------------------------------------------------

  function wire() {
    ui.composer.addEventListener("submit", (event) => {
      event.preventDefault();
      send();
    });
    ui.question.addEventListener("keydown", (event) => {
      // isComposing: Enter that confirms an IME candidate (Chinese input) must not send.
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing && event.keyCode !== 229) {
        event.preventDefault();
        send();
      }
    });
    document.addEventListener("keydown", (event) => {
      if (event.key !== "Escape" || event.defaultPrevented) return;
      if (streaming) stop();
      else closeSidebar();
    });
    ui.stop.addEventListener("click", stop);
    ui.cancelEdit.addEventListener("click", cancelEdit);

    ui.messages.addEventListener("click", (event) => {
      const target = event.target.closest("button");
      if (!target) return;
      const article = target.closest(".message");
      const message = conversation.messages[Number(article?.dataset.index)];
      if (target.classList.contains("copy-code")) {
        copyWithFeedback(target, target.closest(".code-block").querySelector("code").textContent);
      } else if (target.classList.contains("copy-answer") && message) {
        copyWithFeedback(target, message.content);
      } else if (target.classList.contains("regenerate")) {
        regenerate();
      } else if (target.classList.contains("edit-message")) {
        startEdit();
      }
    });

    ui.newChat.addEventListener("click", () => {
      openConversation(null);
      ui.question.focus();
    });
    ui.conversationList.addEventListener("click", (event) => {
      const target = event.target.closest("button");
      if (!target) return;
      if (target.classList.contains("conversation-delete")) removeConversation(target.dataset.id);
      else if (target.dataset.id !== conversation.id) openConversation(target.dataset.id);
      else closeSidebar();
    });
    ui.sidebarToggle.addEventListener("click", () =>
      ui.layout.classList.contains("is-sidebar-open") ? closeSidebar() : openSidebar(),
    );
    ui.backdrop.addEventListener("click", closeSidebar);

    ui.settingsToggle.addEventListener("click", toggleSettings);
    ui.preset.addEventListener("change", () => {
      if (ui.preset.value === "custom") return;
      ui.system.value = ui.preset.value === "none" ? "" : I18n.t(`preset.${ui.preset.value}.text`);
      saveSettings();
    });
    ui.system.addEventListener("input", () => {
      ui.preset.value = presetFor(ui.system.value);
      saveSettings();
    });
    for (const input of [ui.model, ui.temperature, ui.maxTokens]) input.addEventListener("change", saveSettings);
    ui.exportButton.addEventListener("click", exportMarkdown);

    I18n.bindSwitch(document.getElementById("lang-switch"));
    I18n.onChange(() => {
      renderTitle();
      renderMessages();
      renderSidebar();
      ui.preset.value = presetFor(ui.system.value);
    });
  }

  async function start() {
    I18n.apply();
    wire();
    let saved = null;
    try {
      saved = localStorage.getItem(CURRENT_KEY);
    } catch {
      // No storage: start with a new chat.
    }
    await openConversation(saved);
    ui.question.focus();
  }

  start();
})();
