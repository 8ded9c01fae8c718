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
 * (fetch, token dialog, SSE), Store (conversations on the server, settings in
 * localStorage), Markdown (safe rendering). This file only wires them to the page.
 *
 * The server keeps every turn of a conversation and has no operation that
 * replaces or removes one. So "Ask again" (regenerate) sends the last question
 * once more as a new turn, and "Edit & resend" sends the edited question as a
 * new turn: the earlier question and answer stay, in the page as on the server,
 * and the next answer is written with them in its history. Only a question the
 * server never kept (refused before its answer began, say by a rate limit) is
 * replaced in place: "Retry".
 */
(() => {
  const CURRENT_KEY = "chatproxy.currentConversation";
  const COPIED_FOR_MS = 1500;
  const LOAD_MORE_MARGIN_PX = 48;
  const MAX_TITLE_LENGTH = 200; // the server's limit

  const $ = (id) => document.getElementById(id);
  const ui = {
    layout: $("layout"),
    sidebar: $("sidebar"),
    backdrop: $("sidebar-backdrop"),
    sidebarToggle: $("sidebar-toggle"),
    newChat: $("new-chat"),
    nav: $("conversation-nav"),
    conversationList: $("conversation-list"),
    conversationStatus: $("conversation-status"),
    conversationEmpty: $("conversation-empty"),
    conversationError: $("conversation-error"),
    conversationMore: $("conversation-more"),
    usage: $("usage-today"),
    title: $("conversation-title"),
    exportButton: $("export-button"),
    settingsToggle: $("settings-toggle"),
    settingsPanel: $("settings-panel"),
    model: $("setting-model"),
    modelDefault: $("setting-model-default"),
    modelsError: $("models-error"),
    preset: $("setting-preset"),
    system: $("setting-system"),
    systemFixed: $("system-fixed"),
    temperature: $("setting-temperature"),
    maxTokens: $("setting-max-tokens"),
    messages: $("messages"),
    composer: $("composer"),
    question: $("question"),
    send: $("send-button"),
    stop: $("stop-button"),
    editBanner: $("edit-banner"),
    editText: $("edit-banner-text"),
    cancelEdit: $("cancel-edit"),
    deleteDialog: $("delete-dialog"),
    deleteText: $("delete-dialog-text"),
    deleteCancel: $("delete-cancel"),
  };

  const PRESETS = ["concise", "translator", "coder", "teacher"];

  let conversation = Store.draft();
  let loading = false; // the conversation shown is being fetched
  let notice = null; // an ApiError to show above the messages (a conversation that could not be opened)
  let loadCount = 0; // which openConversation call is the latest
  let streaming = null; // { conversation, assistant, controller, element } while an answer is being written
  let editing = false; // the composer holds a copy of the last question
  let modelsLoaded = false;

  // The sidebar: pages of summaries from GET /chat/conversations, newest first.
  const sidebar = { items: [], more: false, loaded: false, loading: false, error: null, refreshes: 0 };
  let renaming = null; // { id, value, saving } while a title is edited in place
  let usageTotal = null; // `total` of GET /usage?days=1, or an Error

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

  /** A stroked 24×24 icon from one path. */
  function icon(d) {
    const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    svg.setAttribute("class", "icon");
    svg.setAttribute("viewBox", "0 0 24 24");
    svg.setAttribute("aria-hidden", "true");
    const path = document.createElementNS("http://www.w3.org/2000/svg", "path");
    path.setAttribute("d", d);
    svg.append(path);
    return svg;
  }

  function remember(key, value) {
    try {
      if (value) localStorage.setItem(key, value);
      else localStorage.removeItem(key);
    } catch {
      // Not remembered across visits; nothing else depends on it.
    }
  }

  function describe(error) {
    return error?.name === "ApiError" ? Api.describe(error) : I18n.t("error.network");
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

  /** The last question, and whether the server kept it (else it is replaced when sent again). */
  function lastQuestion() {
    const index = lastIndexOf("user");
    return index === -1 ? null : { index, message: conversation.messages[index] };
  }

  function isNearBottom() {
    const { scrollHeight, scrollTop, clientHeight } = ui.messages;
    return scrollHeight - scrollTop - clientHeight < 80;
  }

  function scrollToBottom() {
    ui.messages.scrollTop = ui.messages.scrollHeight;
  }

  function formatNumber(value, options = {}) {
    return new Intl.NumberFormat(I18n.lang, options).format(value);
  }

  const SMALLEST_COST = 0.0001;

  function formatCost(usd) {
    const money = (value, digits) =>
      formatNumber(value, { style: "currency", currency: "USD", minimumFractionDigits: 2, maximumFractionDigits: digits });
    if (usd > 0 && usd < SMALLEST_COST) return `< ${money(SMALLEST_COST, 4)}`;
    return money(usd, usd > 0 && usd < 1 ? 4 : 2);
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
    if (isLastQuestion && !streaming && !conversation.gone) {
      const actions = element("div", "message-actions");
      const edit = button("edit-message", I18n.t("chat.edit"));
      edit.title = I18n.t("chat.editTitle");
      actions.append(edit);
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
    else if (message.partial && !message.error) notes.push(I18n.t("chat.partial"));
    if (message.finishReason === "length") notes.push(I18n.t("chat.finishLength"));
    if (notes.length) article.append(element("p", "message-note", notes.join(" ")));

    const footer = element("div", "message-footer");
    footer.append(element("span", "message-usage", usageText(message)));
    if (!live) {
      const actions = element("div", "message-actions");
      if (message.content) actions.append(button("copy-answer", I18n.t("chat.copy")));
      const question = lastQuestion();
      if (isLast && question && !conversation.gone) {
        // A kept question is asked again as a new turn; one the server never kept is replaced.
        const retry = !question.message.stored;
        const again = button("regenerate", I18n.t(retry ? "chat.retry" : "chat.askAgain"));
        again.title = I18n.t(retry ? "chat.retryTitle" : "chat.askAgainTitle");
        actions.append(again);
      }
      footer.append(actions);
    }
    article.append(footer);
    return article;
  }

  function renderMessages() {
    const { messages } = conversation;
    const lastUser = lastIndexOf("user");
    ui.messages.replaceChildren();
    if (notice) {
      const text = I18n.t("chat.loadFailed", { reason: describe(notice) });
      const banner = element("p", "messages-notice", text);
      banner.setAttribute("role", "alert");
      ui.messages.append(banner);
    }
    if (loading) {
      ui.messages.append(element("p", "messages-empty", I18n.t("chat.loading")));
      return;
    }
    if (!messages.length) {
      ui.messages.append(element("p", "messages-empty", I18n.t("chat.empty")));
      return;
    }
    messages.forEach((message, index) => {
      const node =
        message.role === "user"
          ? userMessageElement(message, index === lastUser)
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

  function conversationItem(summary) {
    const item = element("li", "conversation-item");
    const title = summary.title || I18n.t("chat.newTitle");
    if (renaming?.id === summary.id) {
      item.classList.add("is-renaming");
      const input = element("input", "conversation-title-input");
      input.type = "text";
      input.value = renaming.value;
      input.maxLength = MAX_TITLE_LENGTH;
      input.dataset.id = summary.id;
      input.disabled = Boolean(renaming.saving);
      input.setAttribute("aria-label", I18n.t("sidebar.renameLabel", { title }));
      item.append(input);
      return item;
    }
    const open = element("button", "conversation-open", title);
    open.type = "button";
    open.dataset.id = summary.id;
    if (summary.id === conversation.id) open.setAttribute("aria-current", "true");

    const rename = element("button", "conversation-rename icon-button");
    rename.type = "button";
    rename.dataset.id = summary.id;
    rename.setAttribute("aria-label", I18n.t("sidebar.rename", { title }));
    rename.title = rename.getAttribute("aria-label");
    rename.append(icon("M4 20h4L19 9l-4-4L4 16v4zM13.5 6.5l4 4"));

    const remove = element("button", "conversation-delete icon-button");
    remove.type = "button";
    remove.dataset.id = summary.id;
    remove.setAttribute("aria-label", I18n.t("sidebar.delete", { title }));
    remove.title = remove.getAttribute("aria-label");
    const cross = element("span", "", "×");
    cross.setAttribute("aria-hidden", "true");
    remove.append(cross);

    item.append(open, rename, remove);
    return item;
  }

  function renderSidebar() {
    const focusedInput = document.activeElement?.classList.contains("conversation-title-input");
    ui.conversationList.replaceChildren(...sidebar.items.map(conversationItem));
    ui.conversationStatus.hidden = sidebar.loaded || Boolean(sidebar.error);
    ui.conversationEmpty.hidden = !sidebar.loaded || sidebar.items.length > 0;
    ui.conversationError.hidden = !sidebar.error;
    ui.conversationError.textContent = sidebar.error ? sidebar.error.text() : "";
    ui.conversationMore.hidden = !sidebar.more;
    ui.conversationMore.disabled = sidebar.loading;
    const input = ui.conversationList.querySelector(".conversation-title-input");
    if (input && (focusedInput || renaming?.focus)) {
      input.focus();
      if (renaming.focus) input.select();
      renaming.focus = false;
    }
  }

  function renderUsage() {
    if (usageTotal == null) {
      ui.usage.textContent = "";
      ui.usage.removeAttribute("title");
    } else if (usageTotal instanceof Error) {
      ui.usage.textContent = I18n.t("usage.unavailable");
      ui.usage.removeAttribute("title");
    } else {
      const { total_tokens = 0, cost_usd = 0, requests = 0, prompt_tokens = 0, completion_tokens = 0 } = usageTotal;
      ui.usage.textContent = I18n.t("usage.today", { tokens: formatNumber(total_tokens), cost: formatCost(cost_usd) });
      ui.usage.title = I18n.t("usage.todayTitle", {
        requests: formatNumber(requests),
        prompt: formatNumber(prompt_tokens),
        completion: formatNumber(completion_tokens),
      });
    }
  }

  function renderSettings() {
    const { model, temperature, maxTokens } = conversation.settings;
    const stored = Boolean(conversation.id);
    // An empty model means "not named": a stored conversation keeps its own, a new one gets the server's default.
    ui.modelDefault.textContent = stored
      ? I18n.t("settings.modelConversation", { model: conversation.model || "?" })
      : I18n.t("settings.modelDefault");
    if (model && ![...ui.model.options].some((option) => option.value === model)) {
      ui.model.append(new Option(model, model));
    }
    ui.model.value = model || "";
    // The server fixes a conversation's system prompt when it starts.
    const system = stored ? conversation.system : conversation.settings.system;
    ui.system.value = system || "";
    ui.system.readOnly = stored;
    ui.system.placeholder = stored ? "" : I18n.t("settings.systemPlaceholder");
    ui.preset.disabled = stored;
    ui.systemFixed.hidden = !stored;
    ui.temperature.value = temperature ?? "";
    ui.maxTokens.value = maxTokens ?? "";
    ui.preset.value = presetFor(system || "");
  }

  function renderComposer() {
    ui.send.hidden = Boolean(streaming);
    ui.stop.hidden = !streaming;
    ui.editBanner.hidden = !editing;
    if (editing) {
      const replaces = lastQuestion()?.message.stored === false;
      ui.editText.dataset.i18n = replaces ? "chat.editingRetry" : "chat.editing";
      ui.editText.textContent = I18n.t(ui.editText.dataset.i18n);
    }
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

  // --- the conversation list -------------------------------------------------

  function sidebarError(key, error) {
    return { text: () => I18n.t(key, { reason: describe(error) }) };
  }

  /** Fetch the list again from the top, as many as are shown (new, renamed and continued ones move up). */
  async function refreshSidebar() {
    const refresh = ++sidebar.refreshes;
    try {
      const page = await Store.list({ limit: Math.max(Store.PAGE_SIZE, sidebar.items.length) });
      if (refresh !== sidebar.refreshes) return; // a later refresh is under way
      sidebar.items = page.items;
      sidebar.more = page.more;
      sidebar.loaded = true;
      sidebar.error = null;
      const current = page.items.find((item) => item.id === conversation.id);
      if (current && current.title !== conversation.title) {
        conversation.title = current.title; // the server's title (it shortens long questions its own way)
        renderTitle();
      }
    } catch (error) {
      if (refresh !== sidebar.refreshes) return;
      sidebar.error = sidebarError("sidebar.loadFailed", error);
    }
    renderSidebar();
    loadMoreIfAtEnd();
  }

  /** The next page, after the last conversation shown. */
  async function loadMore() {
    if (sidebar.loading || !sidebar.more || !sidebar.items.length) return;
    sidebar.loading = true;
    const refresh = sidebar.refreshes;
    renderSidebar();
    try {
      const page = await Store.list({ before: sidebar.items.at(-1).id });
      if (refresh === sidebar.refreshes) {
        const shown = new Set(sidebar.items.map((item) => item.id));
        sidebar.items.push(...page.items.filter((item) => !shown.has(item.id)));
        sidebar.more = page.more;
        sidebar.error = null;
      }
    } catch (error) {
      sidebar.error = sidebarError("sidebar.loadFailed", error);
      sidebar.more = false; // the button comes back with the next refresh
    } finally {
      sidebar.loading = false;
    }
    renderSidebar();
    loadMoreIfAtEnd();
  }

  /** Scrolled to the end of the list (or the list does not fill it): fetch the next page. */
  function loadMoreIfAtEnd() {
    const { scrollHeight, scrollTop, clientHeight } = ui.nav;
    if (sidebar.more && !sidebar.loading && clientHeight > 0 && scrollHeight - scrollTop - clientHeight < LOAD_MORE_MARGIN_PX) {
      loadMore();
    }
  }

  function showInSidebar(target) {
    if (!target.id || sidebar.items.some((item) => item.id === target.id)) return;
    sidebar.items.unshift({ id: target.id, title: target.title, model: target.model });
    sidebar.loaded = true;
    renderSidebar();
  }

  function dropFromSidebar(id) {
    sidebar.items = sidebar.items.filter((item) => item.id !== id);
    if (renaming?.id === id) renaming = null;
    renderSidebar();
  }

  // --- rename in place -------------------------------------------------------

  function startRename(id) {
    const item = sidebar.items.find((entry) => entry.id === id);
    if (!item) return;
    renaming = { id, value: item.title, saving: false, focus: true };
    renderSidebar();
  }

  function cancelRename() {
    if (!renaming || renaming.saving) return;
    const { id } = renaming;
    renaming = null;
    renderSidebar();
    ui.conversationList.querySelector(`.conversation-open[data-id="${CSS.escape(id)}"]`)?.focus();
  }

  async function commitRename() {
    if (!renaming || renaming.saving) return;
    const { id } = renaming;
    const item = sidebar.items.find((entry) => entry.id === id);
    const title = renaming.value.trim();
    if (!title || title === item?.title) {
      cancelRename();
      return;
    }
    renaming.saving = true;
    renderSidebar();
    try {
      const saved = await Store.rename(id, title);
      if (item) item.title = saved.title;
      if (conversation.id === id) {
        conversation.title = saved.title;
        renderTitle();
      }
      sidebar.error = null;
    } catch (error) {
      if (error.code === "conversation_not_found") dropFromSidebar(id);
      sidebar.error = sidebarError("sidebar.renameFailed", error);
    }
    renaming = null;
    renderSidebar();
    ui.conversationList.querySelector(`.conversation-open[data-id="${CSS.escape(id)}"]`)?.focus();
    refreshSidebar(); // a rename makes it the most recently updated
  }

  // --- delete, after an in-page confirmation ----------------------------------

  let answerDelete = null;

  /** Resolves true when the user confirms deleting the conversation titled `title`. */
  function confirmDelete(title) {
    ui.deleteText.textContent = I18n.t("delete.text", { title: title || I18n.t("chat.newTitle") });
    ui.deleteDialog.showModal();
    ui.deleteCancel.focus(); // the safe choice is the default one
    return new Promise((resolve) => {
      answerDelete = resolve;
    });
  }

  function finishDelete(confirmed) {
    if (ui.deleteDialog.open) ui.deleteDialog.close();
    answerDelete?.(confirmed);
    answerDelete = null;
  }

  async function removeConversation(id) {
    const title = sidebar.items.find((item) => item.id === id)?.title ?? (conversation.id === id ? conversation.title : "");
    if (!(await confirmDelete(title))) return;
    if (streaming?.conversation.id === id) {
      streaming.conversation.removed = true; // so its notes are not kept
      stop();
    }
    try {
      await Store.remove(id);
    } catch (error) {
      sidebar.error = sidebarError("sidebar.deleteFailed", error);
      renderSidebar();
      return;
    }
    sidebar.error = null;
    dropFromSidebar(id);
    if (conversation.id === id) await openConversation(null);
    ui.newChat.focus();
  }

  // --- conversations ---------------------------------------------------------

  async function openConversation(id, { quiet = false } = {}) {
    stop();
    cancelEdit();
    const load = ++loadCount;
    notice = null;
    closeSidebar();
    if (!id) {
      conversation = Store.draft();
      loading = false;
      remember(CURRENT_KEY, null);
      renderAll();
      return;
    }
    const known = sidebar.items.find((item) => item.id === id);
    conversation = { ...Store.draft(), id, title: known?.title || "" };
    loading = true;
    renderAll();
    try {
      const loaded = await Store.load(id);
      if (load !== loadCount) return; // another conversation was opened meanwhile
      conversation = loaded;
      remember(CURRENT_KEY, id);
    } catch (error) {
      if (load !== loadCount) return;
      conversation = Store.draft();
      if (error.code === "conversation_not_found") {
        remember(CURRENT_KEY, null); // deleted, perhaps on another device
        dropFromSidebar(id);
      }
      if (!(quiet && error.code === "conversation_not_found")) notice = error;
    }
    loading = false;
    renderAll();
    scrollToBottom();
  }

  // --- asking ----------------------------------------------------------------

  async function send() {
    const text = ui.question.value.trim();
    if (!text || streaming || loading) return;
    if (editing) {
      const question = lastQuestion();
      // A question the server never kept is replaced; a kept one stays, and the edit is a new turn.
      if (question && !question.message.stored) conversation.messages.length = question.index;
      editing = false;
    }
    notice = null;
    conversation.messages.push({ role: "user", content: text, stored: false });
    if (!conversation.id && !conversation.title) conversation.title = text.split("\n")[0].slice(0, 60);
    ui.question.value = "";
    renderTitle();
    await generate();
  }

  /** Ask the last question of the current conversation (a turn on the server) and stream the answer in. */
  async function generate() {
    const target = conversation;
    const question = target.messages.at(-1);
    const assistant = { role: "assistant", content: "" };
    const body = Store.requestBody(target, question.content);
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
          // The server has accepted the turn and keeps the question from here on.
          question.stored = true;
          assistant.model = payload.model;
          const isNew = !target.id;
          Store.started(target, payload);
          if (isNew && target.id) {
            if (target === conversation) {
              remember(CURRENT_KEY, target.id);
              renderSettings(); // the system prompt is now fixed
            }
            showInSidebar(target);
          }
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
        if (error.code === "conversation_not_found" && target.id) {
          target.gone = true; // deleted, perhaps on another device: no turn can follow
          dropFromSidebar(target.id);
          if (target === conversation) remember(CURRENT_KEY, null);
        }
      }
    } finally {
      streaming = null;
      // The server keeps an answer that has text, or that finished (CONTRACT §3: partial ones too).
      assistant.stored = Boolean(question.stored && (assistant.content || finished));
      if (!finished && assistant.stored) assistant.partial = true;
      if (assistant.stored && !target.removed) Store.rememberAnswer(target, assistant);
      renderComposer();
      if (target === conversation) {
        const follow = isNearBottom();
        renderMessages();
        if (follow) scrollToBottom();
        if (assistant.error) ui.messages.lastElementChild?.querySelector(".message-error")?.setAttribute("role", "alert");
      }
      if (question.stored) refreshSidebar();
      refreshUsage();
    }
  }

  function stop() {
    streaming?.controller.abort();
  }

  /**
   * "Ask again": the server cannot replace an answer, so the last question is
   * sent again as a new turn of the same conversation; the earlier answer stays
   * (and is part of the new answer's history). "Retry": a question the server
   * never kept is sent again in its place.
   */
  function regenerate() {
    if (streaming || loading) return;
    const question = lastQuestion();
    if (!question) return;
    if (question.message.stored) {
      conversation.messages.push({ role: "user", content: question.message.content, stored: false });
    } else {
      conversation.messages.length = question.index + 1; // drop the failed answer
    }
    generate();
  }

  function startEdit() {
    const question = lastQuestion();
    if (!question || streaming) return;
    editing = true;
    ui.question.value = question.message.content;
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

  // --- usage -----------------------------------------------------------------

  let usageRefreshes = 0;

  async function refreshUsage() {
    const refresh = ++usageRefreshes;
    let total;
    try {
      total = await Store.usageToday();
    } catch (error) {
      total = error instanceof Error ? error : new Error(String(error));
    }
    if (refresh !== usageRefreshes) return;
    usageTotal = total;
    renderUsage();
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

  function saveSettings() {
    const settings = conversation.settings;
    settings.model = ui.model.value;
    settings.temperature = numberOrNull(ui.temperature, parseFloat, 0, 2);
    settings.maxTokens = numberOrNull(ui.maxTokens, (v) => parseInt(v, 10), 1, 1e7);
    const defaults = { ...Store.defaultSettings(), model: settings.model, temperature: settings.temperature, maxTokens: settings.maxTokens };
    if (!conversation.id) {
      settings.system = ui.system.value; // fixed once the conversation has started
      defaults.system = settings.system;
    }
    Store.rememberDefaults(defaults);
    Store.saveSettings(conversation);
  }

  async function loadModels() {
    if (modelsLoaded) return;
    try {
      const response = await Api.request("/v1/models");
      if (!response.ok) throw await Api.errorFrom(response);
      const { data = [] } = await response.json();
      const ids = data.map((model) => String(model.id)).sort();
      ui.model.replaceChildren(ui.modelDefault, ...ids.map((id) => new Option(id, id)));
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
    const system = conversation.id ? conversation.system : conversation.settings.system;
    const lines = [`# ${title}`, ""];
    if (system) lines.push(`> ${system.replace(/\n/g, "\n> ")}`, "");
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
    loadMoreIfAtEnd();
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
      if (document.querySelector("dialog[open]")) return; // the dialog closes itself
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
      else if (target.classList.contains("conversation-rename")) startRename(target.dataset.id);
      else if (target.dataset.id !== conversation.id || notice) openConversation(target.dataset.id);
      else closeSidebar();
    });
    ui.conversationList.addEventListener("keydown", (event) => {
      if (!event.target.classList.contains("conversation-title-input")) return;
      if (event.key === "Enter" && !event.isComposing && event.keyCode !== 229) {
        event.preventDefault();
        commitRename();
      } else if (event.key === "Escape") {
        event.preventDefault(); // the page's own Esc (stop, close the drawer) stays out of it
        cancelRename();
      }
    });
    ui.conversationList.addEventListener("input", (event) => {
      if (renaming && event.target.classList.contains("conversation-title-input")) renaming.value = event.target.value;
    });
    // Leaving the field saves, as Enter does (Esc has already cancelled by then).
    ui.conversationList.addEventListener("focusout", (event) => {
      if (event.target.classList.contains("conversation-title-input") && event.target.isConnected) commitRename();
    });
    ui.conversationMore.addEventListener("click", loadMore);
    ui.nav.addEventListener("scroll", loadMoreIfAtEnd, { passive: true });

    ui.deleteDialog.addEventListener("submit", (event) => {
      event.preventDefault();
      finishDelete(true);
    });
    ui.deleteCancel.addEventListener("click", () => finishDelete(false));
    ui.deleteDialog.addEventListener("cancel", (event) => {
      event.preventDefault();
      finishDelete(false);
    });

    ui.sidebarToggle.addEventListener("click", () =>
      ui.layout.classList.contains("is-sidebar-open") ? closeSidebar() : openSidebar(),
    );
    ui.backdrop.addEventListener("click", closeSidebar);

    ui.settingsToggle.addEventListener("click", toggleSettings);
    ui.preset.addEventListener("change", () => {
      if (ui.preset.value === "custom" || conversation.id) return;
      ui.system.value = ui.preset.value === "none" ? "" : I18n.t(`preset.${ui.preset.value}.text`);
      saveSettings();
    });
    ui.system.addEventListener("input", () => {
      if (conversation.id) return;
      ui.preset.value = presetFor(ui.system.value);
      saveSettings();
    });
    for (const input of [ui.model, ui.temperature, ui.maxTokens]) input.addEventListener("change", saveSettings);
    ui.exportButton.addEventListener("click", exportMarkdown);

    I18n.bindSwitch(document.getElementById("lang-switch"));
    I18n.onChange(() => {
      renderTitle();
      renderSettings();
      renderMessages();
      renderComposer();
      renderSidebar();
      renderUsage();
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
    renderUsage();
    refreshSidebar();
    refreshUsage();
    const opened = openConversation(saved, { quiet: true });
    ui.question.focus();
    await opened;
  }

  start();
})();
