"""End to end in headless Chromium: sign in, chat, watch tokens stream, stop, reload mid-reply.

Uses Debian's Chromium (CHROMIUM=/path overrides); browser downloads are not possible here.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.conftest import PASSWORD, LiveServer, create_user, load_message

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run", "--disable-quic",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        missing = f"Chromium not found at {CHROMIUM}; `make test` installs Debian's chromium package"
        pytest.skip(reason=missing)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context()
    context.grant_permissions(["clipboard-read", "clipboard-write"])
    page = context.new_page()
    page.dialogs = []  # type: ignore[attr-defined]
    page.on("dialog", lambda dialog: (page.dialogs.append(dialog.message), dialog.dismiss()))  # type: ignore[attr-defined]
    page.set_default_timeout(20_000)
    yield page
    context.close()


def sign_in(page: Page, server: LiveServer) -> str:
    email = f"browser-{uuid.uuid4().hex[:8]}@example.com"
    create_user(server.settings, email)
    page.goto(f"{server.url}/")
    expect(page).to_have_url(re.compile(r"/login\?next=/$"))
    page.fill("input[name=email]", email)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    expect(page).to_have_url(f"{server.url}/")
    return email


def streaming_text(page: Page) -> str:
    return page.locator("article.assistant.streaming .streaming-text").last.inner_text()


def wait_for_growth(page: Page, at_least: int) -> str:
    page.wait_for_function(
        "n => { const e = [...document.querySelectorAll('article.streaming .streaming-text')].pop();"
        " return e && e.textContent.length > n; }",
        arg=at_least,
    )
    return streaming_text(page)


def newest_reply_id(page: Page) -> str:
    element_id = page.locator("article.assistant").last.get_attribute("id") or ""
    return element_id.removeprefix("msg-")


def test_sign_in_chat_stream_stop_and_reload_mid_reply(page: Page, long_server: LiveServer) -> None:
    sign_in(page, long_server)

    # Send with Enter; the new conversation opens and the reply streams in token by token.
    page.fill("#message", "What is the travel policy?")
    page.keyboard.press("Enter")
    expect(page).to_have_url(re.compile(r"/c/[0-9a-f-]{36}$"))
    expect(page.locator("article.user").first).to_contain_text("What is the travel policy?")
    expect(page.locator("#transcript")).to_have_attribute("aria-busy", "true")
    early = wait_for_growth(page, 0)
    later = wait_for_growth(page, len(early) + 20)
    assert later.startswith(early)

    # Stop: the partial reply stays, rendered and marked stopped, and the model is free again.
    first_reply = newest_reply_id(page)
    page.click("button.stop")
    stopped = page.locator(f"#msg-{first_reply}")
    expect(stopped).to_have_class(re.compile(r"\bstopped\b"))
    expect(stopped).to_contain_text("Stopped.")
    expect(page.locator("#transcript")).to_have_attribute("aria-busy", "false")
    stored = load_message(long_server.settings, first_reply)
    assert stored.status.value == "stopped" and stored.content.startswith(later)
    assert long_server.services.engine.load()["running"] == 0

    # Copy puts the reply's text on the clipboard.
    stopped.locator("button.copy").click()
    expect(stopped.locator("button.copy")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == stored.content

    # Shift+Enter makes a new line instead of sending.
    page.click("#message")
    page.keyboard.type("Line one")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("Line two")
    assert page.input_value("#message") == "Line one\nLine two"
    page.keyboard.press("Enter")
    expect(page.locator("article.user").last).to_contain_text("Line two")
    expect(page.locator("#message")).to_have_value("")

    # Reload mid-reply: the page comes back with the text so far and the stream continues.
    before_reload = wait_for_growth(page, 30)
    second_reply = newest_reply_id(page)
    page.reload()
    after_reload = streaming_text(page)
    assert after_reload.startswith(before_reload)
    continued = wait_for_growth(page, len(after_reload) + 20)
    assert continued.startswith(after_reload)
    page.click("button.stop")
    expect(page.locator(f"#msg-{second_reply}")).to_have_class(re.compile(r"\bstopped\b"))
    stored = load_message(long_server.settings, second_reply)
    # What the page streamed is exactly the start of what was stored: nothing lost or repeated.
    assert stored.content.startswith(continued)
    assert page.dialogs == []  # type: ignore[attr-defined]


def test_admin_uploads_rolls_back_and_a_user_chats_with_the_adapter(
    page: Page, server: LiveServer, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from tests.conftest import build_adapter, zip_directory

    first = zip_directory(
        build_adapter(tiny_model_dir, tmp_path / "v1", seed=11), tmp_path / "policies-v1.zip"
    )
    second = zip_directory(
        build_adapter(tiny_model_dir, tmp_path / "v2", seed=12), tmp_path / "policies-v2.zip"
    )
    email = f"admin-{uuid.uuid4().hex[:8]}@example.com"
    create_user(server.settings, email, admin=True)
    page.goto(f"{server.url}/login")
    page.fill("input[name=email]", email)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.click("a[href='/admin/adapters']")
    expect(page).to_have_url(f"{server.url}/admin/adapters")

    for archive, notes in ((first, "first cut"), (second, "retrained")):
        page.fill("#upload input[name=name]", "policies")
        page.set_input_files("#upload input[name=file]", str(archive))
        page.fill("#upload textarea[name=notes]", notes)
        page.click("#upload button[type=submit]")
        expect(page.locator("#adapter-policies")).to_contain_text(notes)
    serving = page.locator("#adapter-policies tr.active")
    expect(serving).to_contain_text("serving")
    expect(serving.locator("td").first).to_have_text(re.compile(r"^2"))

    # Roll back to version 1 in the browser.
    page.locator("#adapter-policies tr", has_text="first cut").locator("button", has_text="Roll back").click()
    expect(page.locator("#adapter-policies tr.active td").first).to_have_text(re.compile(r"^1"))

    # A refused upload says why, and keeps the page as it was.
    page.fill("#upload input[name=name]", "Bad Name!")
    page.set_input_files("#upload input[name=file]", str(first))
    page.evaluate("document.querySelector('#upload input[name=name]').removeAttribute('pattern')")
    page.click("#upload button[type=submit]")
    expect(page.locator("#notice")).to_contain_text("is not a valid adapter name")

    page.click("a[href='/admin/audit']")
    expect(page.locator("table")).to_contain_text("rollback")

    # The chat offers the adapter; a conversation on it gets a reply.
    page.goto(f"{server.url}/")
    page.select_option("select[name=adapter]", "policies")
    page.fill("#message", "What changed in the travel policy?")
    page.keyboard.press("Enter")
    expect(page).to_have_url(re.compile(r"/c/[0-9a-f-]{36}$"))
    expect(page.locator("#adapter-picker select")).to_have_value("policies")
    expect(page.locator("article.assistant").last).to_have_class(re.compile(r"\bcomplete\b"))
    assert page.dialogs == []  # type: ignore[attr-defined]
