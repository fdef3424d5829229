"""Hostile text for the XSS tests: what a user could type, or a model be steered into writing.

Each payload, were it ever run, calls `alert(N)` (N: its place in PAYLOADS) or sets `window.__xss`,
so a test sees execution as a dialog or a flag; tests/test_browser_xss.py delivers them to the real
page in Chromium as user messages, as model output (stored, and streamed token by token), as
conversation titles and as adapter names and notes.

Grouped by the trick each plays: raw HTML and event handlers, `javascript:`/`data:` URLs (also
hidden behind entities and odd whitespace), Markdown links and images, breaking out of an
attribute or a code fence, markup that mutates when parsed twice (mXSS), htmx's own attributes
(which would turn injected markup into requests with the user's CSRF token), and text that would
forge Server-Sent Events if a delta's line breaks reached the wire unsplit.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Payload:
    name: str
    text: str


# `{js}` becomes `alert(N)`; `{n}` becomes N.
_TEMPLATES: list[tuple[str, str]] = [
    # Raw HTML, event handlers and active elements.
    ("script tag", "<script>{js}</script>"),
    ("img onerror", "<img src=x onerror={js}>"),
    ("svg onload", "<svg onload={js}></svg>"),
    ("script inside svg", "<svg><script>{js}</script></svg>"),
    ("svg animate onbegin", "<svg><animate onbegin={js} attributeName=x dur=1s></animate></svg>"),
    ("details ontoggle", "<details open ontoggle={js}><summary>x</summary></details>"),
    ("body onload", "<body onload={js}>"),
    ("input autofocus onfocus", "<input autofocus onfocus={js}>"),
    ("video source onerror", "<video><source onerror={js}></video><audio src=x onerror={js}></audio>"),
    ("iframe javascript src", '<iframe src="javascript:{js}"></iframe>'),
    (
        "iframe srcdoc",
        '<iframe srcdoc="<script>parent.__xss={n}</script><img src=x onerror=parent.__xss={n}>">',
    ),
    ("object and embed", '<object data="javascript:{js}"></object><embed src="javascript:{js}">'),
    ("base href", '<base href="javascript:{js}//"><a href="x">relative</a>'),
    ("form action", '<form action="javascript:{js}"><button formaction="javascript:{js}">go</button></form>'),
    ("meta refresh", '<meta http-equiv="refresh" content="0;url=javascript:{js}">'),
    (
        "style expression and url",
        '<div style="width:expression({js});background:url(javascript:{js})">x</div>',
    ),
    (
        "style element import",
        "<style>@import 'javascript:{js}';body{background:url(javascript:{js})}</style>",
    ),
    ("a javascript href", '<a href="javascript:{js}">click</a>'),
    ("a data href", '<a href="data:text/html,<script>{js}</script>">click</a>'),
    ("svg xlink href", '<svg><a xlink:href="javascript:{js}"><text x="20" y="20">x</text></a></svg>'),
    ("template script", "<template><script>{js}</script></template>"),
    # Markup that changes meaning when parsed twice (mXSS).
    ("noscript title breakout", '<noscript><p title="</noscript><img src=x onerror={js}>"></noscript>'),
    ("math style mutation", "<math><mtext><table><mglyph><style><img src=x onerror={js}>"),
    ("textarea breakout", "</textarea><img src=x onerror={js}>"),
    # Breaking out of the attribute or element the text is put in (titles, data-copy, input values).
    ("double quote breakout", '"><img src=x onerror={js}>'),
    ("single quote breakout", "'><img src=x onerror={js}>"),
    ("title element breakout", "</title><script>{js}</script>"),
    # Entities and other encodings that must stay text.
    ("entity-encoded tag", "&lt;img src=x onerror={js}&gt;"),
    ("numeric entities", "&#60;script&#62;{js}&#60;/script&#62;"),
    ("entity inside handler", "<img src=x onerror=&#97;lert({n})>"),
    (
        "percent and unicode escapes",
        "%3Cscript%3E{js}%3C/script%3E \\u003cscript\\u003e{js}\\u003c/script\\u003e",
    ),
    # Markdown links and images.
    ("md javascript link", "[click](javascript:{js})"),
    ("md mixed-case scheme", "[click](JaVaScRiPt:{js})"),
    ("md entity colon", "[click](javascript&#58;{js}) [click](javascript&colon;{js})"),
    ("md entity scheme", "[click](&#x6A;avascript:{js})"),
    ("md angle destination", "[click](<javascript:{js}>)"),
    ("md reference link", "[click][hostile]\n\n[hostile]: javascript:{js}"),
    ("md autolink", "<javascript:{js}>"),
    ("md data link", "[click](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==)"),
    ("md vbscript link", "[click](vbscript:msgbox({n}))"),
    ("md image onerror", '![x](x" onerror="{js})'),
    ("md image javascript", "![x](javascript:{js})"),
    ("md link title breakout", '[click](https://example.com "a\\" onmouseover=\\"{js}")'),
    ("md html inside link text", "[<img src=x onerror={js}>](https://example.com)"),
    ("md table cell html", "| a | b |\n|---|---|\n| <img src=x onerror={js}> | <script>{js}</script> |"),
    # Code fences and inline code: closed, broken out of, left open.
    ("inline code", "`<img src=x onerror={js}>`"),
    ("fence breakout", "```\n</code></pre><img src=x onerror={js}>\n```"),
    ("unclosed fence", "```html\n<script>{js}</script>\n<img src=x onerror={js}>"),
    # htmx: attributes that would make the page send requests, or run code through hx-on.
    ("htmx hx-on", '<div hx-on:htmx:load="{js}" hx-on::load="{js}">x</div>'),
    ("htmx hx-post on load", '<div hx-post="/logout" hx-trigger="load" data-hx-post="/logout">x</div>'),
    ("htmx sse", '<div hx-ext="sse" sse-connect="/logout" sse-swap="message">x</div>'),
    # Text that would forge Server-Sent Events, were a delta's line breaks sent as written.
    ("sse event injection", "x\n\nevent: token\ndata: <img src=x onerror={js}>\n\n"),
    ("sse carriage returns", "y\r\nevent: done\r\ndata: <script>{js}</script>\r\n\r\nz"),
]


def _build() -> list[Payload]:
    return [
        Payload(name, template.replace("{js}", f"alert({n})").replace("{n}", str(n)))
        for n, (name, template) in enumerate(_TEMPLATES, start=1)
    ]


PAYLOADS: list[Payload] = _build()
