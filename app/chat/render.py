"""Render chat text as sanitized HTML: Markdown for finished messages, escaped text while streaming.

Model output and user input are untrusted. Markdown is parsed with raw HTML disabled (so `<script>`
stays text), links are limited to safe schemes, and the result goes through nh3 (Ammonia), an
allow-list sanitizer, as a second wall.
"""

from __future__ import annotations

from functools import lru_cache
from html import escape

import nh3
from markdown_it import MarkdownIt
from markupsafe import Markup

_TAGS = {
    "p", "br", "hr", "strong", "em", "del", "code", "pre", "blockquote", "ul", "ol", "li",
    "h1", "h2", "h3", "h4", "h5", "h6", "table", "thead", "tbody", "tr", "th", "td", "a",
}  # fmt: skip
_ATTRIBUTES = {"a": {"href", "title"}, "code": {"class"}, "th": {"style"}, "td": {"style"}, "ol": {"start"}}
_SAFE_SCHEMES = {"http", "https", "mailto"}


@lru_cache
def _markdown() -> MarkdownIt:
    return MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False}).enable(
        ["table", "strikethrough"]
    )


def render_markdown(text: str) -> Markup:
    html = _markdown().render(text)
    clean = nh3.clean(
        html,
        tags=_TAGS,
        attributes=_ATTRIBUTES,
        url_schemes=_SAFE_SCHEMES,
        link_rel="noopener noreferrer nofollow",
        filter_style_properties={"text-align"},
    )
    return Markup(clean)


def render_stream_text(text: str) -> str:
    """A streamed delta as HTML text: escaped, shown as typed (the page keeps whitespace)."""
    return escape(text, quote=False)
