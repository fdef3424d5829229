"""Adapters restricted to groups, on a live server: admins set the groups on the adapters page (or the
admin API); users outside them neither see nor use the adapter, in the chat or the API, where naming it
answers exactly as a name that does not exist. Admins see all.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from tests.conftest import (
    Admin,
    LiveServer,
    Member,
    build_adapter,
    create_api_key,
    make_admin,
    make_settings,
    wait_for_message,
    with_db,
    zip_directory,
)
from tests.routes.test_chat import reply_id

ADAPTER = "finance"


@pytest.fixture(scope="module")
def groups_server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[LiveServer]:
    live = LiveServer(
        make_settings(tmp_path_factory.mktemp("groups"), tiny_model_dir, max_new_tokens=4)
    ).start()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def admin(groups_server: LiveServer, tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Admin:
    admin = make_admin(groups_server)
    root = tmp_path_factory.mktemp("groups-adapter")
    archive = zip_directory(build_adapter(tiny_model_dir, root / "adapter"), root / "adapter.zip")
    assert admin.upload(ADAPTER, archive).status_code == 201
    return admin


@pytest.fixture(autouse=True)
def open_to_everyone_afterwards(groups_server: LiveServer, admin: Admin) -> Iterator[None]:
    yield
    assert restrict(admin, []).status_code == 200
    assert admin.set_default(None).status_code == 200


def restrict(admin: Admin, groups: list[str], name: str = ADAPTER) -> httpx.Response:
    return httpx.put(
        f"{admin.server.url}/api/admin/adapters/{name}/groups", headers=admin.headers, json={"groups": groups}
    )


def in_groups(server: LiveServer, member: Member, groups: list[str]) -> Member:
    """Give `member` the groups their identity provider would name at sign-in."""
    from app.auth.service import get_user_by_email

    async def work(db: AsyncSession) -> None:
        user = await get_user_by_email(db, member.email)
        assert user is not None
        user.groups = groups
        await db.commit()

    with_db(server.settings, work)
    return member


def api(server: LiveServer, member: Member) -> httpx.Client:
    key = create_api_key(server.settings, member.email)
    return httpx.Client(base_url=f"{server.url}/v1", headers={"Authorization": f"Bearer {key}"}, timeout=60)


def models(client: httpx.Client) -> set[str]:
    response = client.get("/models")
    assert response.status_code == 200, response.text
    return {m["id"] for m in response.json()["data"]}


def complete(client: httpx.Client, model: str) -> httpx.Response:
    return client.post(
        "/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
    )


def conversations_of(server: LiveServer, member: Member) -> int:
    from app.models import Conversation, User

    async def count(db: AsyncSession) -> int:
        query = select(func.count()).select_from(Conversation).join(User).where(User.email == member.email)
        return int(await db.scalar(query) or 0)

    return with_db(server.settings, count)


def test_admin_sets_an_adapters_groups_on_its_page_and_the_audit_log_keeps_them(
    groups_server: LiveServer, admin: Admin, member_factory
) -> None:
    page_admin = member_factory(groups_server, admin=True)
    in_groups(groups_server, member_factory(groups_server), ["finance-team"])  # offered when typing groups
    page = page_admin.get("/admin/adapters").text
    assert 'name="groups" value=""' in page and "Everyone sees and uses it." in page
    assert '<option value="finance-team">' in page

    saved = page_admin.post(
        f"/admin/adapters/{ADAPTER}/groups", data={"groups": " finance-team , audit,finance-team,"}
    )
    assert saved.status_code == 200, saved.text
    assert 'name="groups" value="audit, finance-team"' in saved.text
    assert "Only members of audit, finance-team see and use it." in saved.text

    too_long = page_admin.post(f"/admin/adapters/{ADAPTER}/groups", data={"groups": "x" * 201})
    assert too_long.status_code == 400 and "is not a group name" in too_long.text
    assert too_long.headers["HX-Retarget"] == "#notice"
    unknown = page_admin.post("/admin/adapters/nosuch/groups", data={"groups": "audit"})
    assert unknown.status_code == 404 and "There is no adapter named &#39;nosuch&#39;." in unknown.text

    by_api = restrict(admin, ["audit"])
    assert by_api.json() == {"name": ADAPTER, "groups": ["audit"]}
    listed = httpx.get(f"{groups_server.url}/api/admin/adapters", headers=admin.headers).json()
    assert [a["groups"] for a in listed if a["name"] == ADAPTER] == [["audit"]]
    audit = httpx.get(f"{groups_server.url}/api/admin/audit", headers=admin.headers).json()
    assert [(e["action"], e["target"], e["details"]) for e in audit[:2]] == [
        ("set-groups", ADAPTER, {"groups": ["audit"], "previous": ["audit", "finance-team"]}),
        ("set-groups", ADAPTER, {"groups": ["audit", "finance-team"], "previous": []}),
    ]
    assert audit[0]["actor"].startswith("admin-") and audit[1]["actor"] == page_admin.email
    assert "set-groups" in page_admin.get("/admin/audit").text


def test_the_api_lists_and_serves_a_restricted_adapter_only_to_its_groups(
    groups_server: LiveServer, admin: Admin, member_factory
) -> None:
    base = groups_server.settings.model_name
    insider = api(
        groups_server, in_groups(groups_server, member_factory(groups_server), ["finance-team", "staff"])
    )
    outsider = api(groups_server, in_groups(groups_server, member_factory(groups_server), ["staff"]))
    boss = api(groups_server, member_factory(groups_server, admin=True))  # in no group
    assert restrict(admin, ["finance-team"]).status_code == 200

    assert models(insider) == models(boss) == {base, ADAPTER}
    assert models(outsider) == {base}
    assert complete(insider, ADAPTER).status_code == 200
    assert complete(boss, f"{ADAPTER}@1").status_code == 200
    for name in (ADAPTER, f"{ADAPTER}@1"):
        refused, missing = complete(outsider, name), complete(outsider, name.replace(ADAPTER, "nosuch"))
        assert refused.status_code == missing.status_code == 404
        # Word for word the answer for a name that does not exist: the adapter's existence is not revealed.
        assert refused.json()["error"] == {
            **missing.json()["error"],
            "message": missing.json()["error"]["message"].replace("nosuch", ADAPTER),
        }
        assert refused.json()["error"]["code"] == "model_not_found"
    assert complete(outsider, base).status_code == 200

    assert restrict(admin, []).status_code == 200  # open to everyone again
    assert models(outsider) == {base, ADAPTER} and complete(outsider, ADAPTER).status_code == 200
    for client in (insider, outsider, boss):
        client.close()


def test_the_chat_picker_offers_only_the_adapters_open_to_the_user(
    groups_server: LiveServer, admin: Admin, member_factory
) -> None:
    insider = in_groups(groups_server, member_factory(groups_server), ["finance-team"])
    outsider = in_groups(groups_server, member_factory(groups_server), ["staff"])
    assert restrict(admin, ["finance-team"]).status_code == 200
    assert admin.set_default(ADAPTER).status_code == 200

    option = f'<option value="{ADAPTER}"'
    assert f"{option} selected>" in insider.get("/").text  # the default, open to them
    page = outsider.get("/").text
    # Not offered; the restricted default becomes the bare base model for them (with nothing else
    # open to them, the picker is not shown at all).
    assert option not in page and 'name="adapter"' not in page
    refused = outsider.post("/c", data={"message": "Hello", "adapter": ADAPTER})
    assert refused.status_code == 400 and f"The adapter &#39;{ADAPTER}&#39; is not available" in refused.text
    assert "/v1/models" not in refused.text  # the API's wording is not the chat's
    assert conversations_of(groups_server, outsider) == 0

    own = outsider.start_chat("Hello")
    assert option not in outsider.get(f"/c/{own}").text
    switched = outsider.post(f"/c/{own}/adapter", data={"adapter": ADAPTER})
    assert switched.status_code == 400 and "is not available; choose another one" in switched.text

    # An insider's conversation on the adapter, after they leave the group: not served, said so.
    response = insider.post("/c", data={"message": "Hello", "adapter": ADAPTER})
    assert response.status_code == 204, response.text
    conversation = response.headers["HX-Redirect"].rsplit("/", 1)[-1]
    wait_for_message(groups_server.settings, reply_id(insider.get(f"/c/{conversation}").text))
    in_groups(groups_server, insider, [])
    page = insider.get(f"/c/{conversation}").text
    assert f"{ADAPTER} (not available)" in page
    refused = insider.post(f"/c/{conversation}/messages", data={"message": "Again"})
    assert refused.status_code == 409 and "is not available any more" in refused.text
    assert len(re.findall(r'class="message (?:user|assistant)', insider.get(f"/c/{conversation}").text)) == 2

    # Admins see every adapter, whatever their groups.
    page_admin = member_factory(groups_server, admin=True)
    assert f"{option} selected>" in page_admin.get("/").text
