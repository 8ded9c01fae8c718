"use strict";

/*
 * The simple question-and-answer page: the original tutorial's page, done
 * right. jQuery handles the DOM, as it did there; the request itself uses
 * fetch, because $.ajax hands over the body only once it is complete and the
 * answer should appear as it is written (`stream=1`). The answer is model
 * output and goes in as text, never as HTML.
 */
$(() => {
  // Long questions go in a POST body: a URL-encoded Chinese character takes
  // nine bytes, and servers cap the request line (gunicorn at 4094 bytes).
  const MAX_GET_URL = 2000;

  const $form = $("#qa-form");
  const $question = $("#question");
  const $send = $("#send-button");
  const $status = $("#qa-status");
  const $section = $("#answer-section");
  const $answer = $("#answer");
  const $error = $("#answer-error");
  let busy = false;

  I18n.apply();
  I18n.bindSwitch($("#lang-switch")[0]);
  I18n.onChange(() => $status.text(busy ? I18n.t("qa.loading") : ""));

  function setBusy(on) {
    busy = on;
    $send.prop("disabled", on);
    $section.attr("aria-busy", String(on)).toggleClass("is-loading", on);
    $status.text(on ? I18n.t("qa.loading") : "");
  }

  function showError(error) {
    let text;
    if (error.status) {
      // The endpoint's own "error: …" line, plus when to try again if it said so.
      text = error.detail ? `error: ${error.detail}` : Api.describe(error);
      if (error.retryAfter != null) text += ` — ${I18n.t("error.rateLimitedIn", { seconds: error.retryAfter })}`;
    } else {
      text = Api.describe(error);
    }
    $error.text(text).prop("hidden", false);
  }

  function requestFor(input) {
    const params = new URLSearchParams({ input, stream: "1" });
    const path = `/callChatGPT?${params}`;
    if (path.length <= MAX_GET_URL) return [path, { headers: { Accept: "text/plain" } }];
    return ["/callChatGPT", { method: "POST", headers: { Accept: "text/plain" }, body: params }];
  }

  async function ask() {
    const input = $question.val().trim();
    if (!input || busy) return;
    setBusy(true);
    $section.prop("hidden", false);
    $answer.text("");
    $error.text("").prop("hidden", true);

    let answer = "";
    try {
      const [path, options] = requestFor(input);
      const response = await Api.request(path, options);
      if (!response.ok) throw await Api.errorFrom(response);
      await Api.readText(response, (text) => {
        answer += text;
        $answer.text(answer);
      });
      $answer.text(answer.trim()); // as the non-streamed answer is
    } catch (error) {
      showError(error);
    } finally {
      setBusy(false);
    }
  }

  $form.on("submit", (event) => {
    event.preventDefault();
    ask();
  });

  $question.on("keydown", (event) => {
    // isComposing: Enter that confirms an IME candidate (Chinese input) must not submit.
    const original = event.originalEvent;
    if (event.key === "Enter" && !event.shiftKey && !original.isComposing && original.keyCode !== 229) {
      event.preventDefault();
      ask();
    }
  });

  $question.trigger("focus");
});
