"""Markdown renders to safe HTML; streamed text is escaped."""

from __future__ import annotations

import pytest

from app.chat.render import render_markdown, render_stream_text
from tests.conftest import elements

PAYLOADS = [
    "<script>alert(1)</script>",
    "<img src=x onerror=alert(1)>",
    "<svg/onload=alert(1)>",
    "[x](javascript:alert(1))",
    "[x](JaVaScRiPt:alert(1))",
    "[x](&#106;avascript:alert(1))",
    "![x](javascript:alert(1))",
    '![x](x" onerror="alert(1))',
    "<a href='javascript:alert(1)'>x</a>",
    "<iframe src=javascript:alert(1)>",
    "<details open ontoggle=alert(1)>",
    "[x](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==)",
    "<style>body{display:none}</style>",
    "```\n</code></pre><script>alert(1)</script>\n```",
    "| a |\n|---|\n| <img src=x onerror=alert(1)> |",
]


@pytest.mark.parametrize("payload", PAYLOADS)
def test_markdown_never_yields_active_content(payload: str) -> None:
    tags = elements(str(render_markdown(payload)))
    assert not {tag for tag, _ in tags} & {"script", "img", "svg", "iframe", "style", "details", "object"}
    for tag, attrs in tags:
        for name, value in attrs:
            assert not name.startswith("on"), (tag, name)
            if name == "href":
                assert value.startswith(("http:", "https:", "mailto:")) or ":" not in value, value


def test_markdown_keeps_what_answers_need() -> None:
    html = str(
        render_markdown(
            "**Bold**, `code`, [docs](https://intranet.example/x)\n\n- a\n- b\n\n| h |\n|---|\n| c |"
        )
    )
    assert "<strong>Bold</strong>" in html and "<code>code</code>" in html and "<ul>" in html
    assert '<a href="https://intranet.example/x" rel="noopener noreferrer nofollow">docs</a>' in html
    assert "<table>" in html and "<td>c</td>" in html


def test_streamed_text_is_escaped() -> None:
    assert render_stream_text("<b>& it's\n") == "&lt;b&gt;&amp; it's\n"


def test_streamed_carriage_returns_survive_sse() -> None:
    # SSE would end a line at the CR: a CR LF split over two deltas must not become two breaks.
    assert [render_stream_text(part) for part in ("a\r", "\nb")] == ["a&#13;", "\nb"]


def test_loss_sparkline_is_plain_svg() -> None:
    from app.chat.render import loss_sparkline

    svg = str(loss_sparkline([[1, 4.0], [2, 2.0], [3, 1.0]]))
    assert svg.startswith('<svg class="sparkline"') and 'points="1.0,1.0 80.0,23.7 159.0,35.0"' in svg
    assert "loss from 4 to 1 over 3 steps" in svg
    assert {tag for tag, _ in elements(svg)} == {"svg", "title", "polyline"}
    assert str(loss_sparkline(None)) == "" and str(loss_sparkline([[1, 2.0]])) == ""


def test_a_loss_curve_that_is_not_number_pairs_draws_nothing() -> None:
    from app.chat.render import loss_sparkline

    for curve in ("<script>", [["<b>", 1], [2, 3]], [[1], [2]], [{"a": 1}, {"b": 2}], {"x": 1, "y": 2}):
        assert str(loss_sparkline(curve)) == ""  # type: ignore[arg-type]
