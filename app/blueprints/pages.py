"""The pages: `/` (chat) and `/qa` (the tutorial's question box). Both are static HTML whose
scripts come from `static/`; the security headers are set for every response in `create_app`."""

from __future__ import annotations

from flask import Blueprint, render_template

bp = Blueprint("pages", __name__)


@bp.get("/")
def chat_page():
    """The chat page."""
    return render_template("index.html")


@bp.get("/qa")
def qa_page():
    """The simple question-and-answer page that calls `/callChatGPT`."""
    return render_template("qa.html")
