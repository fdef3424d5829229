"""Settings, read from the environment and `.env`, validated once at start-up.

Every field can be set as an environment variable of the same name in upper case
(`MODEL_ID`, `DATABASE_URL`, ...). `get_settings()` is the one way to reach them; nothing
reads the environment at import time.
"""

from __future__ import annotations

import ipaddress
import secrets
from datetime import timedelta
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Self
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.llm.prompts import DEFAULT_SYSTEM_PROMPT

DEMO_MODEL_NAME = "private-gpt-demo"


class Quantization(StrEnum):
    NF4 = "nf4"
    FP4 = "fp4"
    INT8 = "int8"
    NONE = "none"


class LogFormat(StrEnum):
    TEXT = "text"
    JSON = "json"


class Environment(StrEnum):
    DEVELOPMENT = "development"
    PRODUCTION = "production"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    environment: Environment = Environment.DEVELOPMENT
    # Where the SQLite database, the demo model and the secret key live by default.
    data_dir: Path = Path("data")
    # Empty means SQLite at DATA_DIR/private-gpt.db. PostgreSQL: postgresql://user:pass@host/db
    database_url: str = ""

    # A local directory or a Hugging Face hub id; empty means the embedded demo model.
    model_id: str = ""
    # The name API clients use in `model`; defaults to MODEL_ID (or the demo model's name).
    served_model_name: str = ""
    quantization: Quantization = Quantization.NF4
    # On the demo model only: the first `serve` trains a demo adapter on the sample data (about a
    # minute on 2 CPU cores, once per DATA_DIR) and makes it the default. false skips it.
    demo_adapter: bool = True
    # auto = CUDA when a GPU is visible, else the CPU (bitsandbytes runs NF4 there too).
    device: Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$")] = "auto"
    # Override the model's own context length (tokens of prompt + reply).
    context_window: Annotated[int, Field(ge=64)] | None = None

    # Generation limits and defaults.
    max_new_tokens: Annotated[int, Field(ge=1)] = 512
    max_new_tokens_limit: Annotated[int, Field(ge=1)] = 4096
    default_temperature: Annotated[float, Field(ge=0, le=2)] = 0.7
    default_top_p: Annotated[float, Field(gt=0, le=1)] = 0.95
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    # Sequences decoding at once (in one batch); more wait in the queue, and past that requests get 429.
    # Unset: 32 on a GPU (a decoding step for 32 rows takes about three times one row's, H200 in
    # docs/benchmarks.md) and 4 on the CPU.
    max_running_generations: Annotated[int | None, Field(ge=1)] = None
    max_queued_generations: Annotated[int, Field(ge=0)] = 32
    # KV cache budget: the prompt + max_tokens of the running replies, summed, may not exceed this many
    # tokens (a reply that would waits). Unset: only MAX_RUNNING_GENERATIONS bounds it.
    max_batch_tokens: Annotated[int | None, Field(ge=1)] = None
    # Prompt tokens prefilled per engine round, between the running replies' decoding steps. A
    # round's prompts all get their first token when its pass ends: smaller gives a burst's shortest
    # prompts theirs sooner and its longest later, and keeps running streams smoother (the default
    # is app.llm.engine.PREFILL_CHUNK, measured there).
    prefill_chunk_tokens: Annotated[int, Field(ge=16)] = 6144
    # Replay decoding steps from CUDA graphs (on a GPU). false runs every step eagerly: slower, for
    # telling a graph problem from a model problem.
    cuda_graphs: bool = True
    # Keep a bf16 copy of the 4-bit weights, dequantized once, for passes of several tokens: batched
    # decoding steps about 15% faster (H200) for 2 more bytes per parameter (12.3 GiB for Falcon-7B).
    keep_dequantized_weights: bool = False

    # Adapters: how many stay loaded on the GPU (least recently used are unloaded beyond that),
    # the largest LoRA rank accepted, the largest upload, and how often servers look for changes.
    max_resident_adapters: Annotated[int, Field(ge=1)] = 8
    max_adapter_rank: Annotated[int, Field(ge=1)] = 256
    max_adapter_upload_mb: Annotated[int, Field(ge=1)] = 2048
    registry_poll_seconds: Annotated[float, Field(gt=0)] = 2.0

    # Console logs: `text` for people, `json` (one object a line, with the request id) for a log
    # collector.
    log_format: LogFormat = LogFormat.TEXT

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8000
    # HMAC key for session and API-key hashes. Generated into DATA_DIR in development;
    # production refuses to start without one.
    secret_key: SecretStr | None = None
    session_ttl_hours: Annotated[int, Field(ge=1)] = 24 * 7
    # A session unused for this many hours ends (the next request signs in again); 0: only
    # SESSION_TTL_HOURS ends it.
    session_idle_hours: Annotated[int, Field(ge=0)] = 24
    # Failed password sign-ins for one email from one address in 15 minutes before that email is
    # refused from there until the oldest leaves the window (an address gets 10x over all emails);
    # 0: no bound (app/auth/throttle.py).
    sign_in_failure_limit: Annotated[int, Field(ge=0)] = 10
    # Mark cookies Secure (HTTPS only) and send Strict-Transport-Security. Set it whenever the app is
    # reached over HTTPS (HSTS is also sent on any request that arrived over HTTPS).
    cookie_secure: bool = False
    # When set, GET /metrics answers only `Authorization: Bearer <token>` (metrics show how much the
    # server is used, and when); empty leaves it open, for a scraper inside the private network.
    metrics_token: SecretStr | None = None
    # The addresses uvicorn takes X-Forwarded-For / -Proto from (the same variable uvicorn reads),
    # comma-separated; "*" trusts every peer.
    forwarded_allow_ips: str = "127.0.0.1"

    # Sign-in through a reverse proxy that authenticates people and names them in request headers.
    # Honoured only on connections whose direct peer (the TCP address, never X-Forwarded-For) is in
    # TRUSTED_PROXY_ADDRESSES: addresses or CIDR networks, comma-separated. Empty: off.
    trusted_proxy_addresses: Annotated[list[ipaddress.IPv4Network | ipaddress.IPv6Network], NoDecode] = []
    proxy_user_header: str = "X-Forwarded-Email"  # the user's email
    proxy_name_header: str = ""  # their display name (optional; empty: not read)
    proxy_groups_header: str = "X-Forwarded-Groups"  # their groups, comma-separated (empty: not read)

    # OpenID Connect sign-in (authorization code flow with PKCE). OIDC_ISSUER is the provider's
    # issuer URL (its discovery document is ISSUER/.well-known/openid-configuration) or the
    # discovery document's own URL. Empty: off.
    oidc_issuer: str = ""
    oidc_client_id: str = ""
    oidc_client_secret: SecretStr | None = None
    oidc_scopes: str = "openid email profile"
    oidc_groups_claim: str = "groups"  # the ID token (or userinfo) claim listing the user's groups
    oidc_provider_name: str = "single sign-on"  # the login page shows "Sign in with <this>"
    # The callback URL registered at the provider. Empty: derived from the request
    # (<scheme>://<host>/login/oidc/callback), which is right unless a proxy rewrites the host.
    oidc_redirect_uri: str = ""

    # Members of any of these groups (from the proxy header or the OIDC claim) get the admin role,
    # everyone else who signs in that way the user role, at every sign-in. Empty: roles are left
    # as they are (new users are plain users).
    admin_groups: Annotated[list[str], NoDecode] = []
    # People signing in for the first time through the proxy or OIDC wait for an admin's approval
    # (on /admin/users) before they can chat or use the API.
    new_users_require_approval: bool = False

    # Limits on what each person asks of the model (0: unlimited); admins override them per user on
    # /admin/users. Requests that ask for a reply (a chat message, a regenerate, a chat completion)
    # per minute per user, and per API key within that; prompt + completion tokens per user per UTC day.
    rate_limit_per_minute: Annotated[int, Field(ge=0)] = 0
    api_key_rate_limit_per_minute: Annotated[int, Field(ge=0)] = 0
    daily_token_quota: Annotated[int, Field(ge=0)] = 0

    def running_generations(self, device_type: str) -> int:
        """MAX_RUNNING_GENERATIONS, or its default for the device the model runs on."""
        if self.max_running_generations is not None:
            return self.max_running_generations
        return 32 if device_type == "cuda" else 4

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str) -> str:
        if value and not value.startswith(("sqlite", "postgresql", "postgres://")):
            raise ValueError(
                "must start with sqlite:/// or postgresql:// (other databases are not supported)"
            )
        return value

    @field_validator("trusted_proxy_addresses", mode="before")
    @classmethod
    def _networks(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        networks = []
        for item in (part.strip() for part in value.split(",")):
            if not item:
                continue
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ValueError(
                    f"{item!r} is not an IP address or CIDR network (example: 10.0.0.5,10.1.0.0/16)"
                ) from None
        return networks

    @field_validator("admin_groups", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("proxy_user_header", "proxy_name_header", "proxy_groups_header")
    @classmethod
    def _header_name(cls, value: str) -> str:
        if value and not all(c.isalnum() or c in "-_" for c in value):
            raise ValueError(f"{value!r} is not an HTTP header name")
        return value.lower()

    @field_validator("secret_key")
    @classmethod
    def _long_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 32:
            raise ValueError("must be at least 32 characters; generate one with: openssl rand -hex 32")
        return value

    @field_validator("metrics_token")
    @classmethod
    def _long_metrics_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        if len(value.get_secret_value()) < 16:
            raise ValueError(
                "must be at least 16 characters, or empty to leave /metrics open; "
                "generate one with: openssl rand -hex 32"
            )
        return value

    @model_validator(mode="after")
    def _production_is_explicit(self) -> Self:
        if self.environment is Environment.PRODUCTION:
            if self.secret_key is None:
                raise ValueError("SECRET_KEY must be set in production (openssl rand -hex 32)")
            if is_placeholder_secret(self.secret_key.get_secret_value()):
                raise ValueError(
                    "SECRET_KEY is a placeholder; set a random one in production (openssl rand -hex 32)"
                )
            if not self.model_id:
                raise ValueError(
                    "MODEL_ID must be set in production (the demo model is for trying things out)"
                )
        if self.trusted_proxy_addresses and not self.proxy_user_header:
            raise ValueError("PROXY_USER_HEADER must name the header carrying the user's email")
        if self.oidc_issuer:
            issuer = urlsplit(self.oidc_issuer)
            if issuer.scheme not in ("https", "http") or not issuer.netloc:
                raise ValueError("OIDC_ISSUER must be the provider's https:// URL")
            local = issuer.hostname in ("localhost", "127.0.0.1", "::1")
            if issuer.scheme == "http" and not local and self.environment is Environment.PRODUCTION:
                raise ValueError("OIDC_ISSUER must use https:// in production")
            if not self.oidc_client_id:
                raise ValueError("OIDC_CLIENT_ID must be set with OIDC_ISSUER (the provider issues it)")
            if "openid" not in self.oidc_scopes.split():
                raise ValueError("OIDC_SCOPES must include openid")
        if self.max_new_tokens > self.max_new_tokens_limit:
            raise ValueError("MAX_NEW_TOKENS must not exceed MAX_NEW_TOKENS_LIMIT")
        return self

    @property
    def session_idle(self) -> timedelta | None:
        return timedelta(hours=self.session_idle_hours) if self.session_idle_hours else None

    @property
    def oidc_enabled(self) -> bool:
        return bool(self.oidc_issuer)

    @property
    def uses_demo_model(self) -> bool:
        return not self.model_id

    @property
    def demo_model_dir(self) -> Path:
        return self.data_dir / "models" / "demo"

    @property
    def adapter_store_dir(self) -> Path:
        return self.data_dir / "adapters"

    @property
    def model_path_or_id(self) -> str:
        return self.model_id or str(self.demo_model_dir)

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model_id or DEMO_MODEL_NAME

    @property
    def sqlalchemy_url(self) -> str:
        """The async driver URL the server uses."""
        return async_database_url(self.database_url or f"sqlite:///{self.data_dir.resolve()}/private-gpt.db")

    def secret(self) -> bytes:
        """The HMAC key: SECRET_KEY, or in development one generated once into DATA_DIR."""
        if self.secret_key is not None:
            return self.secret_key.get_secret_value().encode()
        path = self.data_dir / "secret_key"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(secrets.token_hex(32))
            path.chmod(0o600)
        return path.read_text().strip().encode()


def is_placeholder_secret(value: str) -> bool:
    """An example's value rather than a secret: 'change-me...', 'xxxx...', a run of one character."""
    squashed = "".join(c for c in value.lower() if c.isalnum())
    return (
        any(word in squashed for word in ("changeme", "placeholder", "secretkey")) or len(set(squashed)) < 6
    )


def async_database_url(url: str) -> str:
    """Map a plain database URL onto the async drivers we ship (aiosqlite, psycopg 3)."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url.removeprefix("postgres://")
    scheme, _, rest = url.partition("://")
    driverless = scheme.split("+")[0]
    if driverless == "sqlite":
        return f"sqlite+aiosqlite://{rest}"
    if driverless == "postgresql":
        return f"postgresql+psycopg://{rest}"
    return url


def sync_database_url(url: str) -> str:
    """The same database through a synchronous driver (for Alembic)."""
    return url.replace("sqlite+aiosqlite://", "sqlite://")


# Never echoed back in an error message: it would land in logs.
SECRET_FIELDS = frozenset({"SECRET_KEY", "METRICS_TOKEN", "OIDC_CLIENT_SECRET"})


class ConfigError(SystemExit):
    """Raised instead of a traceback when the settings are invalid."""


def describe_validation_error(error: ValidationError) -> str:
    lines = ["Invalid configuration (set these in the environment or in .env):"]
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]).upper() or "settings"
        given = item.get("input")
        shown = "" if isinstance(given, dict) or field in SECRET_FIELDS else f" (got {given!r})"
        lines.append(f"  {field}: {item['msg'].removeprefix('Value error, ')}{shown}")
    return "\n".join(lines)


@lru_cache
def get_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as error:
        raise ConfigError(describe_validation_error(error)) from None
