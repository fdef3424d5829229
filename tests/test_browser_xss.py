"""Hostile text on the real pages in headless Chromium: nothing of tests/xss_payloads.py ever runs.

Every payload is delivered where the product shows text it did not write:
  - as user messages (the whole corpus through the real composer, and each payload as a message of
    its own, stored by the chat's data functions);
  - as model output, stored (each payload as a finished reply) and streamed: a scripted model
    output (named as such below) feeds the real generation job, so the real SSE route, the
    per-delta escaping, htmx's swap and the final Markdown render see the corpus token by token,
    cut every few characters so tags and entities arrive in halves;
  - as conversation titles (the sidebar, the header, the rename form, a rename through the page);
  - as adapter names, notes, metrics and sources (the admin pages, the audit log, both adapter
    pickers in the chat, and a refused upload whose notice repeats the name);
  - as the names, groups and emails single sign-on reports for people (the waiting page, the users
    page and an approval through it, the audit log, the chat's account line).
Each page load carries the whole corpus at once. Execution is caught three ways: a dialog (every
payload calls alert(N)), a window flag, and the browser's own Content-Security-Policy violation
events (something the sanitizer let through that only the CSP stopped is a failure too). On top,
the DOM is audited: no event-handler attribute, no script/frame/object/base/meta-refresh element,
no `javascript:`/`data:` URL, and no markup or htmx attribute inside the places that show user text.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, expect
from sqlalchemy.ext.asyncio import AsyncSession

from tests import test_browser
from tests.conftest import PASSWORD, LiveServer, create_user, make_admin, with_db
from tests.test_browser import sign_in
from tests.xss_payloads import PAYLOADS

browser, page = test_browser.browser, test_browser.page  # the fixtures, shared

pytestmark = pytest.mark.browser

TEXTS = [payload.text for payload in PAYLOADS]


def as_parsed(text: str) -> str:
    """`text` as the browser's HTML parser keeps it in the DOM: CR LF and lone CR become LF."""
    return re.sub(r"\r\n?", "\n", text)


# Records CSP violations and the flag; runs before the page's own scripts on every document.
WATCH = """
window.__csp = [];
document.addEventListener('securitypolicyviolation', e =>
    window.__csp.push(e.effectiveDirective + ' ' + e.blockedURI + ' ' + (e.sample || '')));
"""

# The DOM audit. Regions that show user text may hold only the sanitizer's Markdown tags (message
# bodies) or nothing but text (titles, names, notes, streamed text, notices).
AUDIT = """
() => {
  const problems = [];
  const markdownTags = new Set(['p', 'br', 'hr', 'strong', 'em', 'del', 'code', 'pre', 'blockquote',
    'ul', 'ol', 'li', 'h1', 'h2', 'h3', 'h4', 'h5', 'h6', 'table', 'thead', 'tbody', 'tr', 'th', 'td', 'a']);
  const banned = new Set(['iframe', 'frame', 'frameset', 'object', 'embed', 'applet', 'base', 'math',
    'template', 'noscript', 'video', 'audio', 'source', 'style', 'portal']);
  const urlAttributes = new Set(['href', 'src', 'action', 'formaction', 'data', 'xlink:href', 'srcdoc',
    'background', 'poster', 'ping']);
  for (const script of document.scripts) {
    const src = script.getAttribute('src') || '';
    if (!src.startsWith(location.origin + '/static/js/'))
      problems.push('script ' + (src || script.textContent.slice(0, 60)));
  }
  for (const el of document.querySelectorAll('*')) {
    const tag = el.localName;
    if (banned.has(tag)) problems.push('element ' + tag);
    if (tag === 'meta' && el.hasAttribute('http-equiv')) problems.push('meta http-equiv');
    for (const attr of el.attributes) {
      const name = attr.name.toLowerCase();
      if (name.startsWith('on')) problems.push(tag + ' ' + name + '=' + attr.value);
      const scheme = /^[\\s\\u0000-\\u001f]*(javascript|data|vbscript)\\s*:/i;
      if (urlAttributes.has(name) && scheme.test(attr.value))
        problems.push(tag + ' ' + name + '=' + attr.value);
    }
  }
  const check = (selector, allowed) => {
    for (const region of document.querySelectorAll(selector)) {
      for (const el of region.querySelectorAll('*')) {
        if (!allowed.has(el.localName)) problems.push(selector + ' holds <' + el.localName + '>');
        for (const attr of el.attributes) {
          const name = attr.name.toLowerCase();
          if (!['href', 'title', 'rel', 'class', 'start', 'style'].includes(name))
            problems.push(selector + ' <' + el.localName + '> has ' + name);
          if (name === 'class' && !(el.localName === 'code' && /^language-[^ ]*$/.test(attr.value))
              && !(el.localName === 'p' && attr.value === 'plain'))
            problems.push(selector + ' <' + el.localName + '> has class ' + attr.value);
          if (name === 'href' && !/^(https?:|mailto:)/i.test(el.href)) problems.push('href ' + el.href);
        }
      }
    }
  };
  check('#transcript .content.markdown', markdownTags);
  const none = new Set();
  for (const selector of ['#transcript .streaming-text', '#conversation-list a', '.chat-header h1',
                          'select option', '.adapter h2 .name', '.adapter td.notes', 'table.audit-log td',
                          '#notice p.error', '#users td:nth-child(-n+4)', 'main.login strong'])
    check(selector, none);
  for (const el of document.querySelectorAll('#notice > *'))
    if (!el.matches('p.error')) problems.push('#notice holds <' + el.localName + '>');
  return problems;
}
"""


def watch(page: Page) -> None:
    page.add_init_script(WATCH)


def assert_nothing_ran(page: Page, where: str) -> None:
    """No dialog, no flag, no CSP violation, a clean DOM; and any link the sanitizer missed is clicked."""
    # A link whose URL is not plain http(s)/mailto would run its script when clicked: click them all.
    page.evaluate(
        "() => document.querySelectorAll('#transcript .content a, #adapters td a').forEach(a => {"
        " if (!/^(https?:|mailto:)/i.test(a.href)) a.click(); })"
    )
    page.wait_for_timeout(200)
    assert page.dialogs == [], f"{where}: a payload ran: {page.dialogs}"  # type: ignore[attr-defined]
    assert page.evaluate("window.__xss") is None, f"{where}: a payload set window.__xss"
    assert page.evaluate("window.__csp") == [], f"{where}: only the CSP stopped something"
    problems = page.evaluate(AUDIT)
    assert problems == [], f"{where}: {problems}"


def in_db(server: LiveServer, work: Any) -> Any:
    return with_db(server.settings, work)


def on_server_loop(server: LiveServer, work: Any) -> Any:
    """Run the coroutine function `work` on the live server's own event loop, and wait for it."""
    loop = server.server.servers[0].get_loop()
    return asyncio.run_coroutine_threadsafe(work(), loop).result(30)


async def user_named(db: AsyncSession, email: str) -> Any:
    from app.auth import service as auth

    user = await auth.get_user_by_email(db, email)
    assert user is not None
    return user


# -- user messages, stored replies and titles ---------------------------------------------------------


def test_payloads_as_messages_replies_and_titles_never_run(page: Page, server: LiveServer) -> None:
    from app.chat import conversations as chats
    from app.models import Conversation, MessageStatus

    watch(page)
    email = sign_in(page, server)

    # The whole corpus as one message, through the real composer: its title comes from it too.
    corpus = "\n\n".join(TEXTS)
    page.fill("#message", corpus)
    page.click("#composer button[type=submit]")
    expect(page).to_have_url(re.compile(r"/c/[0-9a-f-]{36}$"))
    conversation_id = page.url.rsplit("/", 1)[-1]
    expect(page.locator("article.assistant").last).to_have_class(re.compile(r"\bcomplete\b"))
    assert_nothing_ran(page, "the corpus sent through the composer")

    # Then each payload as a message of its own and as the model's reply to it, and as the title of
    # a conversation of its own; the open conversation talks to an adapter named by a payload.
    async def store(db: AsyncSession) -> list[tuple[str, str]]:
        user = await user_named(db, email)
        conversation = await chats.get_conversation(db, user, conversation_id)
        assert conversation is not None
        shown = []
        for text in TEXTS:
            sent, reply = await chats.add_exchange(
                db, conversation=conversation, user_text=chats.clean_message(text)
            )
            assert sent is not None
            reply.content, reply.status = text, MessageStatus.COMPLETE  # as if the model wrote it
            shown.append((str(sent.id), sent.content))
            await db.commit()
        for text in TEXTS:
            await chats.create_conversation(db, user=user, title=text[:200])
        await db.commit()
        await chats.set_adapter(db, conversation, TEXTS[0][:64])  # not an adapter: "(not available)"
        return shown

    shown = in_db(server, store)
    page.reload()
    expect(page.locator("article.message")).to_have_count(2 + 2 * len(TEXTS))
    assert_nothing_ran(page, "stored messages, replies and titles")
    # Shown exactly as written: each user message, and each title in the sidebar.
    for message_id, content in shown:
        assert page.locator(f"#msg-{message_id} p.plain").text_content() == content
    titles = page.locator("#conversation-list a").all_text_contents()
    assert {as_parsed(text[:200]) for text in TEXTS} <= set(titles)
    unavailable = page.locator("#adapter-picker option[disabled]").text_content()
    assert unavailable == f"{TEXTS[0][:64]} (not available)"

    # Renaming through the page: the form shows the old title in an input, the answer swaps in.
    async def current_title(db: AsyncSession) -> str:
        found = await db.get(Conversation, uuid.UUID(conversation_id))
        assert found is not None
        return found.title

    item = page.locator(f"#conv-{conversation_id}")
    for text in (TEXTS[24], TEXTS[0], TEXTS[-1]):  # '"><img ...', a script tag, forged SSE
        item.locator("button[title=Rename]").click()
        title_input = item.locator("input[name=title]")
        expect(title_input).to_have_value(" ".join(in_db(server, current_title).split()))
        # Only once htmx has taken the form over: a plain submit would reload the page instead.
        page.wait_for_function(
            "id => 'htmx-internal-data' in document.querySelector(`#conv-${id} form`)", arg=conversation_id
        )
        title_input.fill(text)
        title_input.press("Enter")
        expect(item.locator("a")).to_have_text(" ".join(text.split()))
        assert_nothing_ran(page, f"renamed to {text!r}")
    page.reload()
    assert page.locator(".chat-header h1").text_content() == " ".join(TEXTS[-1].split())
    assert page.title().startswith(" ".join(TEXTS[-1].split()))
    assert_nothing_ran(page, "the renamed conversation")

    # A refusal repeats what was sent: an adapter no one published, named by a payload.
    for text in (TEXTS[1], TEXTS[24]):
        page.evaluate(
            "text => { const s = document.querySelector('#adapter-picker select');"
            " s.append(new Option(text, text)); s.value = text;"
            " s.dispatchEvent(new Event('change', {bubbles: true})); }",
            text,
        )
        expect(page.locator("#notice")).to_contain_text(f"The adapter '{text}' is not available")
        assert_nothing_ran(page, f"the refusal of the adapter {text!r}")


# -- model output, streamed --------------------------------------------------------------------------


class ScriptedModelOutput:
    """A stand-in for the engine's GenerationStream that yields exactly the given deltas.

    A real model cannot be made to write chosen text, so this one object replaces it; everything
    downstream (the generation job, the SSE route, escaping each delta, htmx's swap, the final
    Markdown render) is the real code. It waits for `go` before the first delta and for `finish`
    before it ends, so the test can look at the page mid-stream.
    """

    def __init__(self, deltas: list[str]) -> None:
        from app.llm.engine import GenerationResult

        self.deltas = deltas
        self.go = asyncio.Event()
        self.finish = asyncio.Event()
        self.result: GenerationResult | None = None

    def cancel(self) -> None:
        self.go.set()
        self.finish.set()

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._deltas()

    async def _deltas(self) -> AsyncIterator[Any]:
        from app.llm.engine import GenerationResult, TextDelta

        await self.go.wait()
        for count, text in enumerate(self.deltas, start=1):
            yield TextDelta(text, count)
            await asyncio.sleep(0.001)
        await self.finish.wait()
        self.result = GenerationResult("stop", 1, len(self.deltas), 0.01, 0.1)


def test_payloads_streamed_as_model_output_never_run(page: Page, server: LiveServer) -> None:
    from app.chat import conversations as chats

    watch(page)
    email = sign_in(page, server)
    corpus = "\n\n".join(TEXTS)
    # Cut every 3 characters: `<img` and `onerror=` and `&lt;` arrive in pieces.
    deltas = [corpus[i : i + 3] for i in range(0, len(corpus), 3)]

    async def store(db: AsyncSession) -> tuple[str, str]:
        conversation = await chats.create_conversation(db, user=await user_named(db, email))
        _, reply = await chats.add_exchange(db, conversation=conversation, user_text="Stream the corpus")
        return str(conversation.id), str(reply.id)

    conversation_id, reply_id = in_db(server, store)
    scripted = ScriptedModelOutput(deltas)

    async def start() -> None:
        server.services.jobs.start(uuid.UUID(reply_id), scripted)

    on_server_loop(server, start)
    page.goto(f"{server.url}/c/{conversation_id}")
    reply = page.locator(f"#msg-{reply_id}")
    expect(reply).to_have_class(re.compile(r"\bstreaming\b"))

    async def release(event: asyncio.Event) -> None:
        event.set()

    on_server_loop(server, lambda: release(scripted.go))
    # Exactly the model's text, CR LF split across deltas included.
    expected = corpus
    page.wait_for_function(
        "([id, n]) => document.querySelector(`#msg-${id} .streaming-text`).textContent.length >= n",
        arg=[reply_id, len(expected)],
        timeout=60_000,
    )
    assert reply.locator(".streaming-text").text_content() == expected
    assert reply.locator(".streaming-text *").count() == 0
    assert_nothing_ran(page, "the corpus mid-stream")

    on_server_loop(server, lambda: release(scripted.finish))
    expect(reply).to_have_class(re.compile(r"\bcomplete\b"))
    expect(reply.locator(".content.markdown")).to_contain_text("alert(1)")
    assert_nothing_ran(page, "the streamed corpus, rendered at its end")


# -- adapter names and notes ---------------------------------------------------------------------------


def test_payloads_as_adapter_names_and_notes_never_run(
    page: Page, server: LiveServer, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from app.chat import conversations as chats
    from app.registry import service
    from app.registry.inspect import AdapterFacts
    from app.registry.store import StoredAdapter
    from tests.conftest import build_adapter, zip_directory

    watch(page)
    archive = zip_directory(build_adapter(tiny_model_dir, tmp_path / "adapter", seed=21), tmp_path / "a.zip")
    notes = "\n\n".join(TEXTS)
    name = f"xss-{uuid.uuid4().hex[:8]}"
    published = make_admin(server).upload(name, archive, notes=notes)
    assert published.status_code == 201, published.text

    # Names are checked on upload (below), so hostile ones reach the registry only by some other
    # road: written here with the registry's own function, to show the pages escape whatever the
    # database holds.
    email = f"admin-{uuid.uuid4().hex[:8]}@example.com"
    create_user(server.settings, email, admin=True)

    async def store(db: AsyncSession) -> None:
        actor = await user_named(db, email)
        real = (await service.get_adapter(db, name)).versions[0]
        facts = AdapterFacts(
            peft_type=real.peft_type, rank=real.rank, alpha=real.alpha,
            target_modules=tuple(real.target_modules), base_model=real.base_model,
            prompt_template=real.prompt_template, base_fingerprint=real.base_fingerprint,
            tensor_count=1, parameter_count=1, metrics=None, manifest_source=None,
        )  # fmt: skip
        stored = StoredAdapter(sha256=real.sha256, path=Path(), size_bytes=real.size_bytes, files=())
        for text in TEXTS:
            await service.publish_version(
                db, name=text, facts=facts, stored=stored, source="upload", notes=text, actor=actor
            )
        # A manifest's metrics are stored as its author wrote them (any JSON object).
        metrics = {
            "loss_curve": [[TEXTS[0], TEXTS[1]], TEXTS[2]], "final_train_loss": TEXTS[3],
            "eval_loss": TEXTS[4], "tokens_per_s": TEXTS[5], "wall_time_s": TEXTS[6], "steps": TEXTS[7],
            "peak_gpu_memory_gib": TEXTS[8],
        }  # fmt: skip
        await service.publish_version(
            db, name=name, facts=replace(facts, metrics=metrics), stored=stored, source=TEXTS[9],
            notes=notes, actor=actor,
        )  # fmt: skip
        await service.activate_version(db, name=name, version=1, actor=actor)

    in_db(server, store)
    on_server_loop(server, server.services.catalog.refresh)

    page.goto(f"{server.url}/login")
    page.fill("input[name=email]", email)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    expect(page).to_have_url(f"{server.url}/")
    assert_nothing_ran(page, "the new-chat adapter picker")
    offered = page.locator("#composer select[name=adapter] option").all_text_contents()
    assert {as_parsed(text) for text in TEXTS} <= set(offered)

    shown = page.goto(f"{server.url}/admin/adapters")
    assert shown is not None and shown.status == 200, shown and shown.text()
    assert_nothing_ran(page, "the adapters page")
    assert page.locator(f"#adapter-{name} td.notes").first.text_content() == as_parsed(notes)
    assert {as_parsed(text) for text in TEXTS} <= set(page.locator(".adapter h2 .name").all_text_contents())

    page.goto(f"{server.url}/admin/audit")
    assert_nothing_ran(page, "the audit log")

    # A conversation on a hostile name, switched to another hostile name through its picker.
    async def conversation_on(db: AsyncSession) -> str:
        conversation = await chats.create_conversation(
            db, user=await user_named(db, email), title="Picker", adapter_name=TEXTS[1]
        )
        await db.commit()
        return str(conversation.id)

    conversation_id = in_db(server, conversation_on)
    page.goto(f"{server.url}/c/{conversation_id}")
    expect(page.locator("#adapter-picker select")).to_have_value(TEXTS[1])
    page.select_option("#adapter-picker select", TEXTS[0])
    expect(page.locator("#adapter-picker select")).to_have_value(TEXTS[0])
    assert_nothing_ran(page, "the conversation's adapter picker")

    # An upload under a hostile name is refused, and the notice repeats the name as text.
    page.goto(f"{server.url}/admin/adapters")
    for text in (TEXTS[1], TEXTS[24]):
        page.evaluate("document.querySelector('#upload input[name=name]').removeAttribute('pattern')")
        page.fill("#upload input[name=name]", text)
        page.set_input_files("#upload input[name=file]", str(archive))
        page.click("#upload button[type=submit]")
        expect(page.locator("#notice")).to_contain_text(f"{text!r} is not a valid adapter name")
        assert_nothing_ran(page, f"the refused upload named {text!r}")


# -- people from single sign-on ------------------------------------------------------------------------


def test_payloads_as_names_emails_and_groups_from_single_sign_on_never_run(
    page: Page, server: LiveServer
) -> None:
    """An OpenID provider or proxy says who someone is: their name, groups and (whitespace-free) email."""
    from datetime import timedelta

    from app.auth import service as auth
    from app.models import SignInMethod

    watch(page)
    tag = uuid.uuid4().hex[:6]
    policy = auth.SignInPolicy(require_approval=True)

    def email_from(text: str) -> str:  # what normalize_email lets through: no whitespace, one @
        return re.sub(r"[\s@]", "", text).lower()[:200] + f"@{tag}.example"

    async def arrive(db: AsyncSession) -> tuple[list[Any], str]:
        people = []
        for text in TEXTS:
            identity = auth.ExternalIdentity(
                email_from(text), text, (text, f"plain-{tag}"), SignInMethod.OIDC
            )
            user = await auth.sign_in_external(db, identity, policy)
            people.append((str(user.id), user.email, user.display_name))
        waiting = await auth.get_user_by_email(db, email_from(TEXTS[1]))
        assert waiting is not None and not waiting.is_approved
        token, _ = await auth.start_session(
            db,
            user=waiting,
            secret=server.settings.secret(),
            ttl=timedelta(hours=1),
            method=SignInMethod.OIDC,
        )
        return people, token

    people, token = in_db(server, arrive)

    # One of them, signed in and waiting for approval, sees their own name and email.
    page.context.add_cookies([{"name": "pgpt_session", "value": token, "url": server.url}])
    page.goto(f"{server.url}/")
    expect(page.locator("h1")).to_have_text("Waiting for approval")
    assert_nothing_ran(page, "the waiting page")
    assert as_parsed(TEXTS[1]) in (page.locator("main strong").text_content() or "")

    # An admin sees them all, and approves that one through the page.
    admin = f"admin-{tag}@example.com"
    create_user(server.settings, admin, admin=True)
    admin_page = page.context.browser.new_context().new_page()  # type: ignore[union-attr]
    admin_page.dialogs = []  # type: ignore[attr-defined]
    admin_page.on("dialog", lambda d: (admin_page.dialogs.append(d.message), d.dismiss()))  # type: ignore[attr-defined]
    admin_page.add_init_script(WATCH)
    admin_page.goto(f"{server.url}/login")
    admin_page.fill("input[name=email]", admin)
    admin_page.fill("input[name=password]", PASSWORD)
    admin_page.click("button[type=submit]")
    expect(admin_page).to_have_url(f"{server.url}/")
    admin_page.goto(f"{server.url}/admin/users")
    assert_nothing_ran(admin_page, "the users page")
    for user_id, email, name in people:
        cells = admin_page.locator(f"#user-{user_id} td")
        assert cells.nth(0).text_content() == email and cells.nth(1).text_content() == as_parsed(name)
    admin_page.locator(f"#user-{people[1][0]} button", has_text="Approve").click()
    expect(admin_page.locator(f"#user-{people[1][0]}")).to_contain_text("active")
    assert_nothing_ran(admin_page, "the users page after an approval")
    admin_page.goto(f"{server.url}/admin/audit")
    assert_nothing_ran(admin_page, "the audit log of the approval")
    admin_page.context.close()

    # Approved, they chat: their email is in the sidebar.
    page.goto(f"{server.url}/")
    expect(page.locator(".account .muted")).to_have_text(people[1][1])
    assert_nothing_ran(page, "the chat of a person with a hostile name")


def test_the_alarms_go_off_for_markup_that_does_run(page: Page, server: LiveServer) -> None:
    """The checks above would see a payload that got through: inject one past the server and look."""
    watch(page)
    sign_in(page, server)
    page.evaluate(
        "() => { const p = document.createElement('p'); p.className = 'content markdown';"
        " p.innerHTML = '<img src=x onerror=alert(1)><a href=\"javascript:alert(2)\">x</a>';"
        " document.getElementById('transcript').append(p); }"
    )
    with pytest.raises(AssertionError) as caught:
        assert_nothing_ran(page, "injected")
    # The CSP stopped the handler (a violation), so the sanitizer is what the tests above hold to.
    assert "only the CSP stopped something" in str(caught.value)
    page.wait_for_timeout(100)
    problems = page.evaluate(AUDIT)
    assert "img onerror=alert(1)" in problems and any("javascript:alert(2)" in p for p in problems)
