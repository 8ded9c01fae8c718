"use strict";

/*
 * Light/dark theme. Loaded in <head> without `defer` (it is tiny) so that a
 * chosen theme is set on <html> before the first paint, avoiding a flash of
 * the wrong colours. With no choice saved, CSS follows prefers-color-scheme.
 */
const Theme = (() => {
  const STORAGE_KEY = "chatproxy.theme";
  const CHOICES = ["system", "light", "dark"];

  function saved() {
    try {
      const value = localStorage.getItem(STORAGE_KEY);
      return CHOICES.includes(value) ? value : "system";
    } catch {
      return "system";
    }
  }

  function apply(choice) {
    const root = document.documentElement;
    if (choice === "system") delete root.dataset.theme;
    else root.dataset.theme = choice;
  }

  function set(choice) {
    if (!CHOICES.includes(choice)) return;
    apply(choice);
    try {
      localStorage.setItem(STORAGE_KEY, choice);
    } catch {
      // Applied for this visit only.
    }
  }

  apply(saved());

  document.addEventListener("DOMContentLoaded", () => {
    const select = document.getElementById("theme-switch");
    if (!select) return;
    select.value = saved();
    select.addEventListener("change", () => set(select.value));
  });

  return { set, get: saved };
})();
