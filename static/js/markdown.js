"use strict";

/*
 * Model output → safe DOM. The text is parsed with marked and the result is
 * sanitised with DOMPurify on every render, so a tag that arrives split across
 * two deltas can never become live. Raw HTML the model writes is shown as the
 * text it is, forms, frames and styles are removed, links open in a new tab
 * without access to this page, and code blocks get highlighting and a copy button.
 */
const Markdown = (() => {
  const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
  const escapeHtml = (text) => String(text).replace(/[&<>"']/g, (c) => ESCAPES[c]);

  marked.use({
    gfm: true,
    renderer: {
      // "Use a <div> here" should read as written, not vanish into the DOM.
      html({ text, block }) {
        return block ? `<p>${escapeHtml(text.trim())}</p>` : escapeHtml(text);
      },
      // The CSP blocks remote images anyway, and loading them would tell a third party who reads what.
      image({ href, text }) {
        return `<a href="${escapeHtml(href)}">${escapeHtml(text || href)}</a>`;
      },
      // Task lists without <input>, which the sanitiser removes.
      checkbox({ checked }) {
        return checked ? "☑ " : "☐ ";
      },
    },
  });

  const PURIFY = {
    FORBID_TAGS: [
      "style", "link", "meta", "base",
      "form", "input", "button", "textarea", "select", "option", "fieldset",
      "iframe", "frame", "frameset", "object", "embed",
      "img", "picture", "source", "video", "audio", "svg", "math",
    ],
    // id and name could clash with (or clobber) the page's own elements.
    FORBID_ATTR: ["style", "id", "name", "srcset"],
    ALLOW_DATA_ATTR: false,
    RETURN_DOM_FRAGMENT: true,
  };

  const HIGHLIGHT_OUTPUT = { ALLOWED_TAGS: ["span"], ALLOWED_ATTR: ["class"] };

  DOMPurify.addHook("afterSanitizeAttributes", (node) => {
    if (node.tagName === "A" && node.hasAttribute("href")) {
      node.setAttribute("target", "_blank");
      node.setAttribute("rel", "noopener noreferrer");
    }
  });

  // Auto-detection runs every grammar over the code: only for finished answers of a sane size.
  const AUTO_DETECT_LIMIT = 20000;

  function highlight(code, language, final) {
    const source = code.textContent;
    let result = null;
    if (language && hljs.getLanguage(language)) {
      result = hljs.highlight(source, { language, ignoreIllegals: true });
    } else if (final && source.length <= AUTO_DETECT_LIMIT) {
      result = hljs.highlightAuto(source);
    }
    if (!result) return;
    // highlight.js escapes its input; sanitising its output as well costs little.
    code.replaceChildren(DOMPurify.sanitize(result.value, { ...HIGHLIGHT_OUTPUT, RETURN_DOM_FRAGMENT: true }));
    code.classList.add("hljs");
  }

  /** Wrap each <pre><code> in a block with its language and a copy button. */
  function decorate(pre, final) {
    const code = pre.querySelector("code");
    const language = /\blanguage-([\w+#.-]+)/.exec(code.className)?.[1] || "";
    highlight(code, language, final);

    const block = document.createElement("div");
    block.className = "code-block";
    const bar = document.createElement("div");
    bar.className = "code-bar";
    const label = document.createElement("span");
    label.className = "code-language";
    label.textContent = language;
    const copy = document.createElement("button");
    copy.type = "button";
    copy.className = "copy-code";
    copy.textContent = I18n.t("chat.copyCode");
    bar.append(label, copy);
    pre.replaceWith(block);
    block.append(bar, pre);
  }

  /**
   * Replace target's content with text rendered as Markdown. While an answer is
   * still streaming pass final=false: highlighting then skips auto-detection.
   */
  function render(target, text, { final = true } = {}) {
    const fragment = DOMPurify.sanitize(marked.parse(text), PURIFY);
    fragment.querySelectorAll("pre").forEach((pre) => {
      if (pre.querySelector("code")) decorate(pre, final);
    });
    target.replaceChildren(fragment);
  }

  return { render };
})();
