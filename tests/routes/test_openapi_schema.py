"""The OpenAPI schema is for people signed in and API clients; Swagger UI and ReDoc are not served."""

from __future__ import annotations

import httpx

from tests.conftest import LiveServer, create_api_key


def test_the_schema_needs_a_session_or_an_api_key(server: LiveServer, member_factory) -> None:  # type: ignore[no-untyped-def]
    anonymous = httpx.get(f"{server.url}/openapi.json")
    assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"] == "Bearer"
    assert "missing API key" in anonymous.json()["error"]["message"]
    wrong = httpx.get(f"{server.url}/openapi.json", headers={"Authorization": "Bearer pgpt-not-a-key"})
    assert wrong.status_code == 401

    member = member_factory(server)
    by_cookie = member.get("/openapi.json")
    assert by_cookie.status_code == 200 and "/v1/chat/completions" in by_cookie.json()["paths"]
    key = create_api_key(server.settings, member.email)
    by_key = httpx.get(f"{server.url}/openapi.json", headers={"Authorization": f"Bearer {key}"})
    assert by_key.status_code == 200 and by_key.json() == by_cookie.json()
    # The upload's body is documented although no parameter declares it (it is read after the admin check).
    upload = by_key.json()["paths"]["/api/admin/adapters/{name}/versions"]["post"]["requestBody"]
    assert upload["content"]["multipart/form-data"]["schema"]["required"] == ["file"]

    for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        assert member.get(path).status_code == 404, path
