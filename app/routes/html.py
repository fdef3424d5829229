"""Helpers the HTML routes share: page rendering, HTMX detection and error notices."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse, Response

from app.models import AuthSession
from app.services import Services


def is_htmx(request: Request) -> bool:
    return request.headers.get("hx-request") == "true"


def render(
    request: Request,
    services: Services,
    template: str,
    *,
    session: AuthSession | None = None,
    status_code: int = 200,
    headers: dict[str, str] | None = None,
    **context: Any,
) -> HTMLResponse:
    context.update(
        user=session.user if session else None,
        csrf_token=session.csrf_token if session else "",
        model_name=services.settings.model_name,
        is_demo_model=services.is_demo_model,
    )
    return services.templates.TemplateResponse(
        request, template, context, status_code=status_code, headers=headers
    )


def sentence(error: Exception | str) -> str:
    """An error message as a sentence for the page: capital first letter, full stop."""
    text = str(error).strip().rstrip(".")
    return text[:1].upper() + text[1:] + "."


def notice(
    request: Request,
    services: Services,
    message: str,
    *,
    status_code: int,
    headers: dict[str, str] | None = None,
) -> Response:
    """An error the user can act on, shown in the page's notice area (the composer keeps its text)."""
    extra = {"HX-Retarget": "#notice", "HX-Reswap": "innerHTML", **(headers or {})}
    return render(
        request, services, "partials/notice.html", message=message, status_code=status_code, headers=extra
    )


def redirect(request: Request, url: str) -> Response:
    """Navigate to `url`: HX-Redirect for HTMX requests, 303 See Other for plain forms."""
    if is_htmx(request):
        return Response(status_code=204, headers={"HX-Redirect": url})
    return Response(status_code=303, headers={"Location": url})


def forget_cookie(response: Response, services: Services, name: str, *, path: str = "/") -> None:
    """Delete a cookie with the flags it was set with (Secure under COOKIE_SECURE, HttpOnly)."""
    response.delete_cookie(name, path=path, secure=services.settings.cookie_secure, httponly=True)
