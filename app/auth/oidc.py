"""OpenID Connect sign-in: the authorization code flow with PKCE, against the provider at OIDC_ISSUER.

`OidcClient.begin` sends the browser to the provider with a fresh state, nonce and PKCE verifier,
which travel in a short-lived cookie signed with SECRET_KEY (nothing is kept on the server, so
any server process can take the callback). `OidcClient.finish` checks the callback against that
cookie, exchanges the code (with the verifier) at the token endpoint, verifies the ID token's
signature against the provider's published keys (JWKS) and its issuer, audience, expiry and nonce,
and returns who signed in. OAuth via Authlib's httpx client, JOSE via joserfc (Authlib's own
successor to authlib.jose); every call to the provider is async, so the event loop never waits.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

import httpx
from authlib.common.errors import AuthlibBaseError
from authlib.integrations.httpx_client import AsyncOAuth2Client
from joserfc import jwt
from joserfc.errors import InvalidKeyIdError, JoseError
from joserfc.jwk import KeySet

from app.auth.service import ExternalIdentity, parse_groups
from app.config import Settings
from app.models import SignInMethod

STATE_COOKIE = "pgpt_oidc"
STATE_COOKIE_PATH = "/login/oidc"
STATE_TTL_SECONDS = 600  # time to sign in at the provider
DISCOVERY = "/.well-known/openid-configuration"
HTTP_TIMEOUT = 10.0
CLOCK_LEEWAY_SECONDS = 60


class OidcError(Exception):
    """Sign-in through the provider failed; the message says why, for the login page."""


@dataclass(frozen=True)
class Started:
    url: str  # where to send the browser
    cookie: str  # the signed state, for STATE_COOKIE


class OidcClient:
    """The OpenID provider as the server sees it: discovery and keys are fetched once, then cached."""

    def __init__(self, settings: Settings, *, secret: bytes) -> None:
        issuer = settings.oidc_issuer.rstrip("/")
        self.discovery_url = issuer if issuer.endswith(DISCOVERY) else issuer + DISCOVERY
        self.client_id = settings.oidc_client_id
        self.client_secret = (
            settings.oidc_client_secret.get_secret_value() if settings.oidc_client_secret else None
        )
        self.scopes = settings.oidc_scopes
        self.groups_claim = settings.oidc_groups_claim
        self.provider_name = settings.oidc_provider_name
        self.redirect_uri = settings.oidc_redirect_uri
        # A key of its own for the state cookie, derived from SECRET_KEY.
        self._cookie_key = hmac.new(secret, b"oidc state cookie", hashlib.sha256).digest()
        self._metadata: dict[str, Any] | None = None
        self._keys: KeySet | None = None
        self._lock = asyncio.Lock()

    # -- the provider's documents ------------------------------------------------------------------

    async def metadata(self) -> dict[str, Any]:
        if self._metadata is None:
            async with self._lock:
                if self._metadata is None:
                    document = await self._get_json(self.discovery_url, "discovery document")
                    missing = [
                        k
                        for k in ("issuer", "authorization_endpoint", "token_endpoint", "jwks_uri")
                        if not isinstance(document.get(k), str)
                    ]
                    if missing:
                        raise OidcError(
                            f"the provider's discovery document ({self.discovery_url}) lacks "
                            f"{', '.join(missing)}; check OIDC_ISSUER"
                        )
                    self._metadata = document
        return self._metadata

    async def _signing_keys(self, *, refresh: bool = False) -> KeySet:
        if self._keys is None or refresh:
            metadata = await self.metadata()
            document = await self._get_json(metadata["jwks_uri"], "signing keys (JWKS)")
            try:
                self._keys = KeySet.import_key_set(document)  # type: ignore[arg-type]
            except (JoseError, ValueError, KeyError, TypeError) as error:
                raise OidcError(f"the provider's signing keys could not be read: {error}") from None
        return self._keys

    async def _get_json(self, url: str, what: str, **kwargs: Any) -> dict[str, Any]:
        try:
            async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as client:
                response = await client.get(url, **kwargs)
                response.raise_for_status()
                document = response.json()
        except (httpx.HTTPError, ValueError) as error:
            raise OidcError(f"could not fetch the provider's {what} from {url}: {error}") from None
        if not isinstance(document, dict):
            raise OidcError(f"the provider's {what} at {url} is not a JSON object")
        return document

    # -- the flow ------------------------------------------------------------------------------------

    def _client(self, redirect_uri: str) -> AsyncOAuth2Client:
        return AsyncOAuth2Client(
            client_id=self.client_id,
            client_secret=self.client_secret,
            scope=self.scopes,
            redirect_uri=redirect_uri,
            code_challenge_method="S256",
            # A public client (no secret) identifies itself in the body; PKCE protects the code.
            token_endpoint_auth_method="client_secret_basic" if self.client_secret else "none",
            timeout=HTTP_TIMEOUT,
        )

    async def begin(self, *, redirect_uri: str, next_url: str) -> Started:
        metadata = await self.metadata()
        state, nonce = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        verifier = secrets.token_urlsafe(64)  # 86 characters, within RFC 7636's 43 to 128
        async with self._client(redirect_uri) as client:
            url, _ = client.create_authorization_url(
                metadata["authorization_endpoint"], state=state, nonce=nonce, code_verifier=verifier
            )
        cookie = self._sign(
            {"state": state, "nonce": nonce, "verifier": verifier, "next": next_url,
             "redirect_uri": redirect_uri, "expires": int(time.time()) + STATE_TTL_SECONDS}
        )  # fmt: skip
        return Started(url=url, cookie=cookie)

    async def finish(self, *, params: dict[str, str], cookie: str) -> tuple[ExternalIdentity, str]:
        """Check the provider's answer (the callback's query) and return who signed in, and `next`."""
        flow = self._unsign(cookie)
        if flow is None:
            raise OidcError("the sign-in took too long or began in another browser; please try again")
        if "error" in params:
            reason = params.get("error_description") or params["error"]
            raise OidcError(f"the provider refused the sign-in: {reason}")
        if not hmac.compare_digest(params.get("state", ""), flow["state"]):
            raise OidcError("the sign-in answer does not match the sign-in this browser began; try again")
        code = params.get("code", "")
        if not code:
            raise OidcError("the provider sent no authorization code")
        metadata = await self.metadata()
        try:
            async with self._client(flow["redirect_uri"]) as client:
                token = await client.fetch_token(
                    metadata["token_endpoint"],
                    grant_type="authorization_code",
                    code=code,
                    code_verifier=flow["verifier"],
                )
        except AuthlibBaseError as error:
            reason = error.description or error
            raise OidcError(f"the provider refused the authorization code: {reason}") from None
        except httpx.HTTPError as error:
            raise OidcError(f"could not reach the provider's token endpoint: {error}") from None
        if not token.get("id_token"):
            raise OidcError("the provider sent no ID token; OIDC_SCOPES must include openid")
        claims = await self._verified_claims(str(token["id_token"]), nonce=flow["nonce"], metadata=metadata)
        if not claims.get("email") or self.groups_claim not in claims:
            info = await self._userinfo(token, metadata, subject=claims["sub"])
            claims = {**info, **claims}  # the signed ID token wins where both say something
        return self._identity(claims), flow["next"]

    async def _verified_claims(
        self, id_token: str, *, nonce: str, metadata: dict[str, Any]
    ) -> dict[str, Any]:
        algorithms = metadata.get("id_token_signing_alg_values_supported") or ["RS256"]
        algorithms = [a for a in algorithms if a != "none"]
        keys = await self._signing_keys()
        try:
            try:
                decoded = jwt.decode(id_token, keys, algorithms=algorithms)
            except InvalidKeyIdError:  # an unknown key id: the provider may have rotated its keys
                decoded = jwt.decode(id_token, await self._signing_keys(refresh=True), algorithms=algorithms)
            jwt.JWTClaimsRegistry(
                leeway=CLOCK_LEEWAY_SECONDS,
                iss={"essential": True, "value": metadata["issuer"]},
                aud={"essential": True, "value": self.client_id},
                sub={"essential": True},
                exp={"essential": True},
                nonce={"essential": True, "value": nonce},
            ).validate(decoded.claims)
        except (JoseError, ValueError) as error:
            raise OidcError(f"the provider's ID token failed verification: {error}") from None
        return dict(decoded.claims)

    async def _userinfo(
        self, token: dict[str, Any], metadata: dict[str, Any], *, subject: str
    ) -> dict[str, Any]:
        endpoint = metadata.get("userinfo_endpoint")
        if not endpoint or not token.get("access_token"):
            return {}
        headers = {"Authorization": f"Bearer {token['access_token']}"}
        info = await self._get_json(str(endpoint), "userinfo", headers=headers)
        # OIDC Core 5.3.2: userinfo about another subject must not be used.
        return info if info.get("sub") == subject else {}

    def _identity(self, claims: dict[str, Any]) -> ExternalIdentity:
        email = claims.get("email")
        if not isinstance(email, str) or not email:
            raise OidcError(
                "the provider did not say the user's email; OIDC_SCOPES must include email, "
                "and the provider must release the email claim to this client"
            )
        if claims.get("email_verified") is False:
            raise OidcError(f"the provider has not verified the email address {email}")
        raw = claims.get(self.groups_claim, [])
        if isinstance(raw, str):
            groups = parse_groups(raw)
        elif isinstance(raw, list):
            groups = tuple(dict.fromkeys(str(g) for g in raw if str(g).strip()))
        else:
            groups = ()
        name = claims.get("name") or claims.get("preferred_username") or ""
        return ExternalIdentity(email=email, display_name=str(name), groups=groups, method=SignInMethod.OIDC)

    # -- the state cookie ----------------------------------------------------------------------------

    def _sign(self, payload: dict[str, Any]) -> str:
        body = base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")
        return f"{body}.{self._mac(body)}"

    def _unsign(self, cookie: str) -> dict[str, Any] | None:
        body, _, mac = cookie.rpartition(".")
        if not body or not hmac.compare_digest(mac, self._mac(body)):
            return None
        payload: dict[str, Any] = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        if int(payload.get("expires", 0)) < time.time():
            return None
        return payload

    def _mac(self, body: str) -> str:
        return hmac.new(self._cookie_key, body.encode(), hashlib.sha256).hexdigest()
