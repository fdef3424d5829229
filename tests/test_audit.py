"""The audit log: what it records, that admins can filter and export all of it, and that nothing
changes or deletes it (no route of the app, and on SQLite and PostgreSQL not the database either).

Live servers, real databases: sign-ins through the form, the trusted proxy and OpenID Connect (the
fake provider of tests/routes/test_sign_in.py), the account page and the admin pages.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import csv
import io
import json
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import delete, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

from app import audit
from app.models import AuditEvent, User
from tests import test_browser
from tests.conftest import (
    PASSWORD,
    Admin,
    LiveServer,
    build_adapter,
    create_api_key,
    create_user,
    make_settings,
    new_postgres_database,
    sign_in,
    with_db,
    zip_directory,
)
from tests.routes import test_sign_in
from tests.routes.test_authorization_matrix import app_routes
from tests.routes.test_sign_in import FakeOpenIdProvider, oidc_sign_in, proxied, unique_email

# Fixtures of theirs this module uses too.
browser = test_browser.browser
provider, sso_server = test_sign_in.provider, test_sign_in.sso_server


def events(server: LiveServer, **where: str) -> list[dict[str, Any]]:
    """Every audit event the filter selects, oldest first, as the JSON export writes them."""

    async def read(db: AsyncSession) -> list[dict[str, Any]]:
        rows = await audit.recent(db, audit.parse_filter(**where), limit=100_000)
        return [audit.as_dict(row) for row in reversed(rows)]

    return with_db(server.settings, read)


def all_rows(server: LiveServer) -> dict[int, tuple[Any, ...]]:
    async def read(db: AsyncSession) -> dict[int, tuple[Any, ...]]:
        rows = (await db.scalars(select(AuditEvent))).all()
        return {
            r.id: (r.at, r.actor_id, r.actor_email, r.action, r.target, json.dumps(r.details)) for r in rows
        }

    return with_db(server.settings, read)


def failed_password_sign_in(server: LiveServer, email: str, password: str) -> httpx.Response:
    with httpx.Client(base_url=server.url) as browser:
        token = re.search(r'name="csrf_token" value="([^"]+)"', browser.get("/login").text)
        assert token
        return browser.post(
            "/login", data={"email": email, "password": password, "csrf_token": token.group(1)}
        )


# -- the database refuses ------------------------------------------------------------------------------


def test_the_database_refuses_to_change_or_delete_audit_rows(database_url: str, tmp_path: Path) -> None:
    from app.migrate import upgrade_database

    settings = make_settings(tmp_path, tmp_path, database_url=database_url)
    upgrade_database(settings.sqlalchemy_url)

    async def attempt(db: AsyncSession) -> list[str]:
        user = User(email="gone@example.com", password_hash="")
        db.add(user)
        await db.flush()
        db.add(audit.event(user, "user.password", "gone@example.com"))
        await db.commit()
        refusals = []
        for statement in (
            update(AuditEvent).values(action="nothing"),
            update(AuditEvent).values(details={"forged": True}),
            update(AuditEvent).values(actor_email="someone-else@example.com"),
            delete(AuditEvent),
        ):
            try:
                await db.execute(statement)
                await db.commit()
            except DBAPIError as error:
                await db.rollback()
                refusals.append(str(error.orig))
        if database_url.startswith("postgresql"):
            try:
                await db.execute(text("TRUNCATE audit_events"))
                await db.commit()
            except DBAPIError as error:
                await db.rollback()
                refusals.append(str(error.orig))
        # Deleting the user still works: the row keeps who it was, without the link.
        await db.execute(delete(User).where(User.email == "gone@example.com"))
        await db.commit()
        rows = (
            await db.execute(select(AuditEvent.actor_id, AuditEvent.actor_email, AuditEvent.action))
        ).all()
        assert [tuple(row) for row in rows] == [(None, "gone@example.com", "user.password")]
        return refusals

    refusals = with_db(settings, attempt)
    expected = 5 if database_url.startswith("postgresql") else 4
    assert len(refusals) == expected, refusals
    assert all("audit_events is append-only" in refusal for refusal in refusals), refusals


# -- what is recorded ----------------------------------------------------------------------------------


def test_sign_ins_are_audited_with_the_client_and_failed_ones_without_the_password(
    sso_server: LiveServer, provider: FakeOpenIdProvider
) -> None:
    email = unique_email("audited")
    create_user(sso_server.settings, email)
    start = len(events(sso_server))
    member = sign_in(sso_server, email)
    member.client.close()
    wrong = "wrong-password-" + uuid.uuid4().hex
    assert failed_password_sign_in(sso_server, email, wrong).status_code == 401
    stranger = "=cmd|' /C calc'!A0@example.com"  # also a formula, for the CSV export below
    assert failed_password_sign_in(sso_server, stranger, wrong).status_code == 401

    # The trusted proxy: first sight creates the account and signs in; later requests reuse it.
    proxied_email = unique_email("proxied-audit")
    with httpx.Client(base_url=sso_server.url, headers=proxied(proxied_email, groups="staff")) as visitor:
        assert visitor.get("/").status_code == 200
        assert visitor.get("/").status_code == 200
        # Joins an admin group at the provider: a role change, recorded as the sign-in's.
        assert visitor.get("/", headers=proxied(proxied_email, groups="staff,it-admins")).status_code == 200

    # OpenID Connect: one that works, one whose token fails verification.
    oidc_email = unique_email("oidc-audit")
    browser, callback = oidc_sign_in(sso_server, provider, {"email": oidc_email, "groups": ["staff"]})
    browser.close()
    assert callback.status_code == 303
    provider.tamper = {"aud": "another-client"}
    try:
        browser, callback = oidc_sign_in(sso_server, provider, {"email": unique_email("forged")})
    finally:
        provider.tamper = {}
    browser.close()
    assert callback.status_code == 400

    seen = [(e["actor"], e["action"], e["target"], e["details"]) for e in events(sso_server)[start:]]
    assert seen == [
        (email, "sign-in", email, {"method": "password", "client": "127.0.0.1"}),
        ("(sign-in)", "sign-in.failed", email, {
            "method": "password", "client": "127.0.0.1",
            "reason": "wrong email or password, or the account is disabled"}),
        ("(sign-in)", "sign-in.failed", stranger, {
            "method": "password", "client": "127.0.0.1",
            "reason": "wrong email or password, or the account is disabled"}),
        ("(sign-in)", "user.create", proxied_email, {
            "role": "user", "method": "proxy", "groups": ["staff"], "approved": True}),
        (proxied_email, "sign-in", proxied_email, {"method": "proxy", "client": "127.0.0.1"}),
        ("(sign-in)", "user.role", proxied_email, {
            "role": "admin", "previous": "user", "groups": ["staff", "it-admins"], "method": "proxy"}),
        ("(sign-in)", "user.create", oidc_email, {
            "role": "user", "method": "oidc", "groups": ["staff"], "approved": True}),
        (oidc_email, "sign-in", oidc_email, {"method": "oidc", "client": "127.0.0.1"}),
        ("(sign-in)", "sign-in.failed", "(no email)", {
            "method": "oidc", "client": "127.0.0.1",
            "reason": seen[-1][3]["reason"]}),
    ]  # fmt: skip
    assert "failed verification" in seen[-1][3]["reason"]
    assert wrong not in json.dumps(events(sso_server)), "a password tried is in the audit log"


def test_account_and_user_administration_are_audited(server: LiveServer) -> None:
    admin_email, email = unique_email("audit-admin"), unique_email("audit-user")
    create_user(server.settings, admin_email, admin=True)
    create_user(server.settings, email)
    admin, person, laptop = sign_in(server, admin_email), sign_in(server, email), sign_in(server, email)
    start = len(events(server))
    made = person.post("/account/api-keys", data={"name": "ci"}, headers={"HX-Request": "false"})
    assert made.status_code == 201, made.text
    key_id = re.search(r'action="/account/api-keys/(\d+)/revoke"', made.text)
    prefix = re.search(r"<code>(pgpt-[^<…]+)…</code>", made.text)
    assert key_id and prefix
    assert person.post(f"/account/api-keys/{key_id.group(1)}/revoke").status_code == 204
    rows = re.findall(r'<tr id="session-(\d+)">(.*?)</tr>', person.get("/account").text, re.DOTALL)
    laptop_id = [number for number, row in rows if "this browser" not in row]
    assert len(rows) == 2 and len(laptop_id) == 1, rows
    assert person.post(f"/account/sessions/{laptop_id[0]}/revoke").status_code == 204
    user = with_db(server.settings, lambda db: db.scalar(select(User).where(User.email == email)))
    for action in ("disable", "enable", "sign-out"):
        assert admin.post(f"/admin/users/{user.id}", data={"action": action}).status_code == 200
    again = sign_in(server, email)
    assert again.post("/account/sign-out-everywhere").status_code == 204
    admin.client.post("/logout", data={"csrf_token": admin.csrf})
    target = f"{email} key {prefix.group(1)}"
    seen = [(e["actor"], e["action"], e["target"]) for e in events(server)[start:]]
    assert seen == [
        (email, "api-key.create", target),
        (email, "api-key.revoke", target),
        (email, "session.revoke", email),
        (admin_email, "user.disable", email),
        (admin_email, "user.enable", email),
        (admin_email, "user.sign-out", email),
        (email, "sign-in", email),
        (email, "user.sign-out", email),
        (admin_email, "sign-out", admin_email),
    ]
    for member in (person, laptop, again, admin):
        member.client.close()


def test_the_command_line_is_audited_as_such(server: LiveServer) -> None:
    email = unique_email("cli")
    start = len(events(server))
    create_user(server.settings, email)  # what `python -m app create-user` calls
    create_api_key(server.settings, email)
    seen = [(e["actor"], e["action"], e["target"][: len(email)]) for e in events(server)[start:]]
    assert seen == [("(command line)", "user.create", email), ("(command line)", "api-key.create", email)]


# -- reading and exporting -----------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def busy_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[LiveServer]:
    """A server whose audit log holds 1,234 events, more than a page and than an export batch."""
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(new_postgres_database()) if request.param == "postgresql" else None
        settings = make_settings(tmp_path_factory.mktemp("audit"), tiny_model_dir, database_url=url)
        live = LiveServer(settings).start()
        stack.callback(live.stop)
        with_db(live.settings, fill_audit_log)
        yield live


async def fill_audit_log(db: AsyncSession) -> None:
    old = datetime(2026, 1, 15, 12, tzinfo=UTC)
    for i in range(1234):
        row = audit.event(
            None, "publish" if i % 2 else "sign-in.failed", f"target-{i}", label="(server)", i=i
        )
        if i < 100:
            row.at = old + timedelta(minutes=i)  # January: for the date filter
        db.add(row)
    await db.commit()


def test_admins_export_every_event_as_csv_and_json(busy_server: LiveServer) -> None:
    email = unique_email("exporter")
    create_user(busy_server.settings, email, admin=True)
    admin = sign_in(busy_server, email)
    key = create_api_key(busy_server.settings, email)
    total = len(events(busy_server))
    assert total > 1234

    page = admin.get("/admin/audit")
    assert page.status_code == 200 and page.text.count("<tr><td>") == audit.PAGE_ROWS
    assert 'href="/admin/audit/export?format=csv"' in page.text

    exported = admin.get("/admin/audit/export?format=csv")
    assert exported.status_code == 200 and exported.headers["content-type"].startswith("text/csv")
    assert exported.headers["content-disposition"].startswith('attachment; filename="audit-')
    rows = list(csv.reader(io.StringIO(exported.text)))
    assert rows[0] == list(audit.COLUMNS) and len(rows) == total + 1
    ids = [int(row[0]) for row in rows[1:]]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == total

    as_json = httpx.get(
        f"{busy_server.url}/api/admin/audit/export",
        params={"format": "json"},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert as_json.status_code == 200, as_json.text
    assert [row["id"] for row in as_json.json()] == ids
    assert as_json.json()[-1]["details"] == {"i": 0}

    # Filters: the same on the page, the export and the API.
    january = {"since": "2026-01-01", "until": "2026-01-31"}
    filtered = admin.get("/admin/audit/export", params={"format": "json", **january, "action": "publish"})
    assert [row["details"]["i"] for row in filtered.json()] == list(range(99, 0, -2))
    api = httpx.get(
        f"{busy_server.url}/api/admin/audit",
        params={"action": "sign-in", "actor": "SERV", "limit": 1000},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert api.status_code == 200 and {row["action"] for row in api.json()} == {"sign-in.failed"}
    assert len(api.json()) == 617
    listed = admin.get("/admin/audit", params={"actor": email})
    assert "target-" not in listed.text and f"<td>{email}</td><td>sign-in</td>" in listed.text
    assert f'href="/admin/audit/export?format=json&amp;actor={email.replace("@", "%40")}"' in listed.text

    refused = admin.get("/admin/audit", params={"since": "15/01/2026"})
    assert refused.status_code == 422 and "Since must be a date as YYYY-MM-DD" in refused.text
    for path in ("/api/admin/audit", "/api/admin/audit/export"):
        bad = httpx.get(
            f"{busy_server.url}{path}",
            params={"since": "2026-02-01", "until": "2026-01-01"},
            headers={"Authorization": f"Bearer {key}"},
        )
        assert bad.status_code == 422 and "is before since" in bad.json()["detail"]
    admin.client.close()


def test_a_cell_that_a_spreadsheet_would_run_is_defused() -> None:
    async def rows() -> Any:
        row = audit.event(None, "sign-in.failed", '=HYPERLINK("http://evil")', label="(sign-in)")
        row.id, row.at = 1, datetime.now(UTC)
        yield row

    async def collect() -> str:
        return "".join([chunk async for chunk in audit.csv_export(rows())])

    # A thread of its own: this module's Chromium test (sync Playwright) keeps an event loop running
    # in the test thread, where asyncio.run() and pytest-asyncio's runner both refuse to start.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        exported = pool.submit(asyncio.run, collect()).result()
    assert "'=HYPERLINK" in exported and "\n=HYPERLINK" not in exported.replace(",", "\n")


# -- nothing edits or deletes it -----------------------------------------------------------------------


def fill_path(path: str, values: dict[str, str]) -> str:
    return re.sub(r"{(\w+)}", lambda m: values.get(m.group(1), "1"), path)


# Each route is sent once per variant: path values over the defaults, and the form (or JSON for PUT)
# that goes with them, so the admin actions are done for real (disable, enable, sign out, limits,
# adapter groups, default, activate, delete, upload) as well as refused.
WALK_VARIANTS: list[tuple[dict[str, str], dict[str, str] | None]] = [
    ({}, None),
    ({"action": "disable"}, {"action": "disable", "groups": "staff", "name": "walk",
                             "rate_limit_per_minute": "5", "daily_token_quota": "100", "key_id": "1"}),
    ({"action": "enable"}, {"action": "enable", "groups": "", "name": "",
                            "rate_limit_per_minute": "", "daily_token_quota": ""}),
    ({"action": "activate"}, {"action": "sign-out", "name": "walk"}),
    ({"action": "delete"}, {"action": "approve", "name": ""}),
]  # fmt: skip


def test_no_route_changes_or_deletes_earlier_audit_rows(
    server: LiveServer, tmp_path: Path, tiny_model_dir: Path
) -> None:
    """Every route of the app, as an admin with a valid CSRF token, doing each admin action: the
    audit rows written before are all still there, unchanged. The audit routes take no other method."""
    email, target = unique_email("walker"), unique_email("walked")
    create_user(server.settings, email, admin=True)
    create_user(server.settings, target)
    key = create_api_key(server.settings, email)
    archive = zip_directory(build_adapter(tiny_model_dir, tmp_path / "adapter"), tmp_path / "adapter.zip")
    admin = Admin(server, key)
    assert admin.upload("walk", archive).status_code == 201
    member = sign_in(server, email)
    walked = with_db(server.settings, lambda db: db.scalar(select(User).where(User.email == target)))
    # Something of every kind in the log first (an admin action, a failed sign-in).
    assert member.post(f"/admin/users/{walked.id}", data={"action": "sign-out"}).status_code == 200
    failed_password_sign_in(server, email, "not-the-password")
    member.client.close()
    before = all_rows(server)
    defaults = {"user_id": str(walked.id), "session_id": "1", "key_id": "1", "path": "css/app.css",
                "name": "walk", "version": "1"}  # fmt: skip
    routes = sorted(app_routes(server.app))
    assert ("GET", "/api/admin/audit/export") in routes
    statuses = set()
    for method, path in routes:
        for values, form in WALK_VARIANTS:
            url = fill_path(path, {**defaults, **values})
            member = sign_in(server, email)  # some routes sign out
            headers = {"X-CSRF-Token": member.csrf, "Authorization": f"Bearer {key}"}
            body: dict[str, Any] = {"data": form}
            if method == "PUT":
                body = {
                    "json": {"name": (form or {}).get("name") or None, "groups": ["staff"] if form else []}
                }
            elif path in ("/admin/adapters", "/api/admin/adapters/{name}/versions") and form:
                body["files"] = {"file": ("adapter.zip", archive.read_bytes(), "application/zip")}
            response = member.client.request(method, url, headers=headers, timeout=120, **body)
            assert response.status_code < 500, f"{method} {url}: {response.status_code} {response.text[:200]}"
            statuses.add(response.status_code)
            member.client.close()
    assert {200, 201, 303} <= statuses
    for url in ("/admin/audit", "/api/admin/audit", "/admin/audit/export", "/api/admin/audit/export"):
        for method in ("POST", "PUT", "PATCH", "DELETE"):
            response = httpx.request(method, f"{server.url}{url}", headers={"Authorization": f"Bearer {key}"})
            assert response.status_code == 405, f"{method} {url}: {response.status_code}"
    after = all_rows(server)
    assert {i: after.get(i) for i in before} == before
    done = {row[3] for i, row in after.items() if i not in before}
    expected = {"user.disable", "user.enable", "user.sign-out", "user.limits", "set-groups", "publish",
                "rollback", "disable", "enable", "sign-in", "sign-out", "api-key.create"}  # fmt: skip
    assert expected <= done, expected - done
    assert PASSWORD not in json.dumps([list(map(str, row)) for row in after.values()])


@pytest.mark.browser
def test_admins_filter_and_download_the_audit_log_in_chromium(busy_server: LiveServer, browser: Any) -> None:
    email = unique_email("reader")
    create_user(busy_server.settings, email, admin=True)
    context = browser.new_context(accept_downloads=True)
    try:
        page = context.new_page()
        page.set_default_timeout(20_000)
        page.goto(f"{busy_server.url}/login?next=/admin/audit")
        page.fill("input[name=email]", email)
        page.fill("input[name=password]", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_url("**/admin/audit")
        page.fill("input[name=action]", "publish")
        page.fill("input[name=since]", "2026-01-15")
        page.fill("input[name=until]", "2026-01-15")
        page.click("text=Filter")
        page.wait_for_url("**/admin/audit?*")
        assert page.locator("table.audit-log tbody tr").count() == 50
        with page.expect_download() as download:
            page.click("text=CSV")
        saved = Path(download.value.path()).read_text()
        assert len(saved.strip().splitlines()) == 51 and "target-99" in saved
    finally:
        context.close()
