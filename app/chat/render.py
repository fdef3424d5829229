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
    """A streamed delta as HTML text: escaped, shown as typed (the page keeps whitespace).

    Carriage returns go as a character reference: SSE ends a line at a bare CR too, so a CR LF
    split across two deltas would reach the page as two line breaks, and the streamed text would
    no longer be the stored one.
    """
    return escape(text, quote=False).replace("\r", "&#13;")


def loss_sparkline(curve: list[list[float]] | None, width: int = 160, height: int = 36) -> Markup:
    """A training loss curve as a small inline SVG (no script, so the page's CSP allows it)."""
    if not isinstance(curve, list) or len(curve) < 2:
        return Markup("")
    try:
        steps = [float(point[0]) for point in curve]
        losses = [float(point[1]) for point in curve]
    except (TypeError, ValueError, IndexError, KeyError):
        # A manifest's metrics are stored as its author wrote them: a curve that is not
        # [step, loss] pairs of numbers is left out, not a 500 on the adapters page.
        return Markup("")
    low, high = min(losses), max(losses)
    span_x, span_y = (steps[-1] - steps[0]) or 1.0, (high - low) or 1.0
    points = " ".join(
        f"{(x - steps[0]) / span_x * (width - 2) + 1:.1f},{(high - y) / span_y * (height - 2) + 1:.1f}"
        for x, y in zip(steps, losses, strict=True)
    )
    label = escape(f"loss from {losses[0]:.3g} to {losses[-1]:.3g} over {int(steps[-1])} steps")
    return Markup(
        f'<svg class="sparkline" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{label}"><title>{label}</title><polyline fill="none" stroke="currentColor" '
        f'stroke-width="1.5" points="{points}"/></svg>'
    )
