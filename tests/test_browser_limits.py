"""In headless Chromium: a user over their rate limit sends a message, and the page says so, keeps
their text in the composer and stores nothing; the adapter picker offers only the adapters open to them.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect
from sqlalchemy.ext.asyncio import AsyncSession

from tests import test_browser
from tests.conftest import LiveServer, build_adapter, make_admin, wait_for_message, with_db, zip_directory
from tests.test_browser import newest_reply_id, sign_in

pytestmark = pytest.mark.browser

browser, page = test_browser.browser, test_browser.page  # the fixtures, shared


def change_user(server: LiveServer, email: str, **values: object) -> None:
    from app.auth.service import get_user_by_email

    async def work(db: AsyncSession) -> None:
        user = await get_user_by_email(db, email)
        assert user is not None
        for name, value in values.items():
            setattr(user, name, value)
        await db.commit()

    with_db(server.settings, work)


def test_over_the_limit_the_page_says_so_and_keeps_the_message(page: Page, server: LiveServer) -> None:
    email = sign_in(page, server)
    change_user(server, email, rate_limit_per_minute=1)
    if 60 - time.time() % 60 < 25:  # the window is the calendar minute: start early in one
        time.sleep(60 - time.time() % 60 + 0.2)
    page.fill("#message", "How many days of leave do I get?")
    page.keyboard.press("Enter")
    expect(page.locator("article.assistant")).to_have_count(1)
    wait_for_message(server.settings, newest_reply_id(page))

    page.fill("#message", "And when is payday?")
    page.keyboard.press("Enter")
    notice = page.locator("#notice")
    expect(notice).to_contain_text(
        "Not sent: Too many requests: your limit is 1 request a minute; try again in "
    )
    expect(page.locator("#message")).to_have_value("And when is payday?")
    expect(page.locator("article.user")).to_have_count(1)  # nothing added, on the page or
    page.reload()
    expect(page.locator("article.user")).to_have_count(1)  # in the database


def test_the_picker_offers_only_the_adapters_open_to_the_user(
    page: Page, server: LiveServer, tmp_path: Path, tiny_model_dir: Path
) -> None:
    admin = make_admin(server)
    name = f"hr-{uuid.uuid4().hex[:6]}"
    archive = zip_directory(build_adapter(tiny_model_dir, tmp_path / "adapter"), tmp_path / "adapter.zip")
    try:
        for adapter in (name, f"{name}-private"):
            assert admin.upload(adapter, archive).status_code == 201
        response = httpx.put(
            f"{server.url}/api/admin/adapters/{name}-private/groups",
            headers=admin.headers,
            json={"groups": ["hr"]},
        )
        assert response.status_code == 200
        email = sign_in(page, server)
        picker = page.locator("#composer select[name=adapter]")
        expect(picker.locator(f"option[value='{name}']")).to_have_count(1)
        expect(picker.locator(f"option[value='{name}-private']")).to_have_count(0)

        change_user(server, email, groups=["hr"])
        page.reload()
        expect(picker.locator(f"option[value='{name}-private']")).to_have_count(1)
    finally:  # the server is the session's: leave it without adapters, as the other tests expect
        for adapter in (name, f"{name}-private"):
            admin.act(adapter, 1, "delete")
