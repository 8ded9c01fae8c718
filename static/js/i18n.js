"use strict";

/*
 * Interface strings in English and Simplified Chinese.
 *
 * The language comes from localStorage (the user's choice) or navigator.language.
 * Static markup is labelled with data-i18n* attributes and filled by I18n.apply();
 * code that builds text itself calls I18n.t() and re-renders on I18n.onChange().
 */
const I18n = (() => {
  const STORAGE_KEY = "chatproxy.lang";

  const STRINGS = {
    en: {
      "app.title": "ChatGPT Proxy",
      "qa.title": "Ask a question",
      "qa.subtitle": "One question, one answer. For a conversation, use the chat page.",
      "qa.label": "Your question",
      "qa.placeholder": "Type a question and press Enter (Shift+Enter for a new line)",
      "qa.submit": "Ask",
      "qa.loading": "Thinking…",
      "qa.answer": "Answer",
      "qa.toChat": "Open the chat",

      "nav.qa": "Simple Q&A page",
      "lang.label": "Language",
      "theme.label": "Theme",
      "theme.system": "System",
      "theme.light": "Light",
      "theme.dark": "Dark",

      "sidebar.label": "Conversations",
      "sidebar.toggle": "Show or hide the conversation list",
      "sidebar.new": "New chat",
      "sidebar.empty": "No conversations yet.",
      "sidebar.delete": "Delete conversation “{title}”",
      "sidebar.rename": "Rename conversation “{title}”",
      "sidebar.renameLabel": "New title for “{title}” (Enter saves, Esc cancels)",
      "sidebar.more": "Load more",
      "sidebar.loading": "Loading…",
      "sidebar.loadFailed": "Could not load the conversations. {reason}",
      "sidebar.renameFailed": "Could not rename the conversation. {reason}",
      "sidebar.deleteFailed": "Could not delete the conversation. {reason}",

      "delete.title": "Delete this conversation?",
      "delete.text": "“{title}” will be deleted from the server, for every browser and device that uses your access token. This cannot be undone.",
      "delete.confirm": "Delete",
      "delete.cancel": "Cancel",

      "usage.today": "Today: {tokens} tokens · {cost}",
      "usage.todayTitle": "Your usage since midnight UTC: {requests} requests, {prompt} prompt + {completion} completion tokens.",
      "usage.unavailable": "Today's usage could not be loaded.",

      "chat.newTitle": "New chat",
      "chat.empty": "Ask anything. Answers stream in as they are written.",
      "chat.label": "Your message",
      "chat.placeholder": "Message (Enter to send, Shift+Enter for a new line)",
      "chat.send": "Send",
      "chat.stop": "Stop",
      "chat.export": "Export",
      "chat.exportTitle": "Download this conversation as Markdown",
      "chat.settings": "Settings",
      "chat.you": "You",
      "chat.assistant": "Assistant",
      "chat.copy": "Copy",
      "chat.copyCode": "Copy code",
      "chat.copied": "Copied",
      "chat.askAgain": "Ask again",
      "chat.askAgainTitle": "Send your last question again as a new turn. This answer stays in the conversation.",
      "chat.retry": "Retry",
      "chat.retryTitle": "The server did not keep this question. Send it again.",
      "chat.edit": "Edit & resend",
      "chat.editTitle": "Put a copy of this question in the message box, to change it and send it as a new turn",
      "chat.editing": "Editing a copy of your last question. It is sent as a new turn; the earlier question and answer stay.",
      "chat.editingRetry": "Editing your last question. The server did not keep it, so sending replaces it.",
      "chat.loading": "Loading the conversation…",
      "chat.loadFailed": "Could not open the conversation. {reason}",
      "chat.partial": "This answer is incomplete: it was stopped or cut off.",
      "chat.cancelEdit": "Cancel",
      "chat.stopped": "Stopped.",
      "chat.usage": "{prompt} + {completion} = {total} tokens",
      "chat.finishLength": "Cut short at the token limit.",

      "settings.title": "Conversation settings",
      "settings.model": "Model",
      "settings.modelDefault": "Server default",
      "settings.modelsFailed": "Could not load the model list.",
      "settings.modelConversation": "This conversation's model ({model})",
      "settings.systemFixed": "The system prompt is fixed when a conversation starts. Start a new chat to use another.",
      "settings.preset": "System prompt preset",
      "settings.system": "System prompt",
      "settings.systemPlaceholder": "Optional instructions for the assistant",
      "settings.temperature": "Temperature",
      "settings.maxTokens": "Max tokens",
      "settings.default": "default",
      "settings.close": "Close",

      "preset.custom": "Custom",
      "preset.none": "None (server default)",
      "preset.concise": "Concise assistant",
      "preset.concise.text": "You are a helpful assistant. Answer concisely and accurately. Say so when you are not sure.",
      "preset.translator": "Translator (Chinese ⇄ English)",
      "preset.translator.text": "Translate the user's text: Chinese into English, anything else into Simplified Chinese. Reply with the translation only.",
      "preset.coder": "Programming helper",
      "preset.coder.text": "You are an experienced software engineer. Give working code in fenced code blocks with the language named, and explain briefly.",
      "preset.teacher": "Patient teacher",
      "preset.teacher.text": "Explain things step by step for a beginner, with a short example, and check understanding at the end.",

      "token.title": "Access token required",
      "token.text": "This server asks for an access token. It is kept in this browser only.",
      "token.refused": "That token was not accepted. Check it and try again.",
      "token.label": "Access token",
      "token.submit": "Continue",
      "token.cancel": "Cancel",

      "error.rateLimitedIn": "Too many requests. Try again in {seconds} s.",
      "error.rateLimited": "Too many requests. Try again shortly.",
      "error.budget": "Today's token budget is spent. It resets at midnight UTC.",
      "error.unreachable": "The AI service cannot be reached right now. Try again later.",
      "error.timeout": "The AI service took too long to answer. Try again.",
      "error.badResponse": "The AI service sent an answer that could not be used. Try again.",
      "error.upstreamAuth": "The server's own API key was refused by the AI service. Tell the administrator.",
      "error.notConfigured": "This server is not configured yet: no API key is set. Tell the administrator.",
      "error.token": "An access token is needed to use this server.",
      "error.modelNotAllowed": "This model is not allowed on this server. Pick another in Settings.",
      "error.tooLong": "The conversation is too long for this model. Start a new chat.",
      "error.tooLarge": "The request is too large.",
      "error.network": "Cannot reach the server. Check your connection.",
      "error.cutOff": "The answer was cut off before it finished.",
      "error.conversationGone": "This conversation is no longer on the server (it may have been deleted on another device). Start a new chat.",
      "error.http": "Something went wrong (HTTP {status}).",
    },

    "zh-CN": {
      "app.title": "ChatGPT 代理",
      "qa.title": "提问",
      "qa.subtitle": "一问一答。如需多轮对话，请使用聊天页面。",
      "qa.label": "你的问题",
      "qa.placeholder": "输入问题后按 Enter 发送（Shift+Enter 换行）",
      "qa.submit": "提问",
      "qa.loading": "思考中…",
      "qa.answer": "回答",
      "qa.toChat": "打开聊天",

      "nav.qa": "简单问答页面",
      "lang.label": "语言",
      "theme.label": "主题",
      "theme.system": "跟随系统",
      "theme.light": "浅色",
      "theme.dark": "深色",

      "sidebar.label": "对话",
      "sidebar.toggle": "显示或隐藏对话列表",
      "sidebar.new": "新对话",
      "sidebar.empty": "还没有对话。",
      "sidebar.delete": "删除对话“{title}”",
      "sidebar.rename": "重命名对话“{title}”",
      "sidebar.renameLabel": "“{title}”的新标题（Enter 保存，Esc 取消）",
      "sidebar.more": "加载更多",
      "sidebar.loading": "加载中…",
      "sidebar.loadFailed": "无法加载对话列表。{reason}",
      "sidebar.renameFailed": "无法重命名对话。{reason}",
      "sidebar.deleteFailed": "无法删除对话。{reason}",

      "delete.title": "删除此对话？",
      "delete.text": "“{title}”将从服务器上删除，使用你的访问令牌的所有浏览器和设备上都会消失。此操作无法撤销。",
      "delete.confirm": "删除",
      "delete.cancel": "取消",

      "usage.today": "今日：{tokens} 个 token · {cost}",
      "usage.todayTitle": "自 UTC 零点以来的用量：{requests} 次请求，提示 {prompt} + 回答 {completion} 个 token。",
      "usage.unavailable": "无法加载今日用量。",

      "chat.newTitle": "新对话",
      "chat.empty": "随便问点什么，回答会边生成边显示。",
      "chat.label": "你的消息",
      "chat.placeholder": "输入消息（Enter 发送，Shift+Enter 换行）",
      "chat.send": "发送",
      "chat.stop": "停止",
      "chat.export": "导出",
      "chat.exportTitle": "将此对话下载为 Markdown 文件",
      "chat.settings": "设置",
      "chat.you": "你",
      "chat.assistant": "助手",
      "chat.copy": "复制",
      "chat.copyCode": "复制代码",
      "chat.copied": "已复制",
      "chat.askAgain": "再问一次",
      "chat.askAgainTitle": "把上一个问题作为新的一轮再发送一次，本回答仍保留在对话中。",
      "chat.retry": "重试",
      "chat.retryTitle": "服务器没有保存这个问题，再发送一次。",
      "chat.edit": "编辑并重发",
      "chat.editTitle": "把这个问题的副本放进输入框，修改后作为新的一轮发送",
      "chat.editing": "正在编辑上一个问题的副本。它将作为新的一轮发送，之前的问答仍会保留。",
      "chat.editingRetry": "正在编辑上一个问题。服务器没有保存它，发送后将替换它。",
      "chat.loading": "正在加载对话…",
      "chat.loadFailed": "无法打开对话。{reason}",
      "chat.partial": "此回答不完整：已被停止或中断。",
      "chat.cancelEdit": "取消",
      "chat.stopped": "已停止。",
      "chat.usage": "{prompt} + {completion} = {total} 个 token",
      "chat.finishLength": "已达到 token 上限，回答被截断。",

      "settings.title": "对话设置",
      "settings.model": "模型",
      "settings.modelDefault": "服务器默认",
      "settings.modelsFailed": "无法加载模型列表。",
      "settings.modelConversation": "此对话的模型（{model}）",
      "settings.systemFixed": "系统提示词在对话开始时确定，之后无法更改。如需其他提示词，请开始新对话。",
      "settings.preset": "系统提示词预设",
      "settings.system": "系统提示词",
      "settings.systemPlaceholder": "可选：给助手的指示",
      "settings.temperature": "温度",
      "settings.maxTokens": "最大 token 数",
      "settings.default": "默认",
      "settings.close": "关闭",

      "preset.custom": "自定义",
      "preset.none": "无（服务器默认）",
      "preset.concise": "简洁助手",
      "preset.concise.text": "你是一个乐于助人的助手。回答要简洁准确，不确定时请直说。",
      "preset.translator": "翻译（中 ⇄ 英）",
      "preset.translator.text": "翻译用户的文字：中文译成英文，其他语言译成简体中文。只回复译文。",
      "preset.coder": "编程助手",
      "preset.coder.text": "你是一名经验丰富的软件工程师。请在标明语言的代码块中给出可运行的代码，并简要解释。",
      "preset.teacher": "耐心的老师",
      "preset.teacher.text": "请面向初学者一步一步地讲解，配一个简短的例子，最后确认对方是否理解。",

      "token.title": "需要访问令牌",
      "token.text": "此服务器需要访问令牌。令牌只保存在本浏览器中。",
      "token.refused": "该令牌未被接受，请检查后重试。",
      "token.label": "访问令牌",
      "token.submit": "继续",
      "token.cancel": "取消",

      "error.rateLimitedIn": "请求过于频繁，请在 {seconds} 秒后重试。",
      "error.rateLimited": "请求过于频繁，请稍后重试。",
      "error.budget": "今日的 token 额度已用完，将于 UTC 零点重置。",
      "error.unreachable": "暂时无法连接到 AI 服务，请稍后重试。",
      "error.timeout": "AI 服务响应超时，请重试。",
      "error.badResponse": "AI 服务返回了无法使用的回答，请重试。",
      "error.upstreamAuth": "AI 服务拒绝了服务器自身的 API 密钥，请联系管理员。",
      "error.notConfigured": "服务器尚未配置 API 密钥，请联系管理员。",
      "error.token": "使用此服务器需要访问令牌。",
      "error.modelNotAllowed": "此服务器不允许使用该模型，请在设置中另选一个。",
      "error.tooLong": "对话超出了该模型的长度上限，请开始新对话。",
      "error.tooLarge": "请求内容过大。",
      "error.network": "无法连接到服务器，请检查网络。",
      "error.cutOff": "回答在完成前被中断。",
      "error.conversationGone": "服务器上已没有这个对话（可能已在其他设备上删除）。请开始新对话。",
      "error.http": "出错了（HTTP {status}）。",
    },
  };

  const LANGUAGES = Object.keys(STRINGS);
  const listeners = [];

  function detect() {
    let saved = null;
    try {
      saved = localStorage.getItem(STORAGE_KEY);
    } catch {
      // Storage can be disabled; fall back to the browser's language.
    }
    if (LANGUAGES.includes(saved)) return saved;
    const preferred = navigator.languages?.length ? navigator.languages : [navigator.language];
    return preferred.some((tag) => /^zh\b/i.test(tag || "")) ? "zh-CN" : "en";
  }

  let lang = detect();

  /** The string for key in the current language, with {name} placeholders filled. */
  function t(key, vars = {}) {
    const template = STRINGS[lang][key] ?? STRINGS.en[key] ?? key;
    return template.replace(/\{(\w+)\}/g, (whole, name) => (name in vars ? String(vars[name]) : whole));
  }

  /** Fill every data-i18n* element under root; values go in as text, never as HTML. */
  function apply(root = document) {
    document.documentElement.lang = lang;
    root.querySelectorAll("[data-i18n]").forEach((el) => {
      el.textContent = t(el.dataset.i18n);
    });
    for (const attr of ["placeholder", "title", "aria-label"]) {
      const dataName = "i18n" + attr.replace(/(^|-)(\w)/g, (m, dash, c) => c.toUpperCase());
      root.querySelectorAll(`[data-i18n-${attr}]`).forEach((el) => {
        el.setAttribute(attr, t(el.dataset[dataName]));
      });
    }
    if (document.body?.dataset.i18nDocTitle) document.title = t(document.body.dataset.i18nDocTitle);
  }

  function setLang(next) {
    if (!LANGUAGES.includes(next) || next === lang) return;
    lang = next;
    try {
      localStorage.setItem(STORAGE_KEY, lang);
    } catch {
      // Not remembered, but still switched for this visit.
    }
    apply();
    listeners.forEach((listener) => listener(lang));
  }

  /** Wire a <select> so that it shows and switches the language. */
  function bindSwitch(select) {
    if (!select) return;
    select.value = lang;
    select.addEventListener("change", () => setLang(select.value));
  }

  return {
    t,
    apply,
    setLang,
    bindSwitch,
    get lang() {
      return lang;
    },
    onChange: (listener) => listeners.push(listener),
  };
})();
