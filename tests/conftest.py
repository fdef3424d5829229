"""Shared fixtures: the real tiny NF4 model, real SQLite and PostgreSQL databases, live servers.

The tiny model is built once per test session by the same builder as the demo model and loaded
through the same loader as a real checkpoint. Servers are real uvicorn servers on localhost,
each in its own thread with its own event loop, reached over HTTP like a browser would.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

from app.llm.demo import DemoModelShape, ensure_demo_model
from app.llm.loader import LoadedModel, ModelSpec, load_model

# The web stack is imported where it is used, not here: tests/llm runs on the GPU machine, which
# has torch, transformers, peft and bitsandbytes but no web stack (docs/benchmarks.md, "GPU tests").
if TYPE_CHECKING:
    import httpx
    from sqlalchemy.ext.asyncio import AsyncSession

    from app.config import Settings

POSTGRES_ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
PASSWORD = "correct horse battery"
T = TypeVar("T")


# -- the model -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_demo_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def eos_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model whose first choice is always end-of-text."""
    return ensure_demo_model(tmp_path_factory.mktemp("models") / "eos", DemoModelShape(eos="always"))


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path) -> LoadedModel:
    return load_model(ModelSpec(str(tiny_model_dir), quantization="nf4", device="cpu"))


# -- databases -------------------------------------------------------------------------------------


def _postgres_reachable() -> str | None:
    try:
        import psycopg

        with psycopg.connect(POSTGRES_ADMIN_URL, connect_timeout=3):
            return None
    except Exception as error:
        return f"PostgreSQL is not reachable at {POSTGRES_ADMIN_URL}: {error}"


@contextlib.contextmanager
def new_postgres_database() -> Iterator[str]:
    """A fresh, empty PostgreSQL database, dropped afterwards; skips the test where none runs."""
    problem = _postgres_reachable()
    if problem:
        pytest.skip(reason=problem)
    import psycopg

    name = f"pgpt_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{POSTGRES_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of each kind we support."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/test.db"
    else:
        with new_postgres_database() as url:
            yield url


# -- live servers ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LiveServer:
    """The real app under uvicorn in a background thread."""

    def __init__(self, settings: Settings) -> None:
        from app.main import create_app
        from app.migrate import upgrade_database

        self.settings = settings
        upgrade_database(settings.sqlalchemy_url)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(settings)
        import uvicorn

        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on",
            proxy_headers=False,  # as `python -m app serve`: the app applies forwarded headers itself
        )  # fmt: skip
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    @property
    def services(self) -> Any:
        return self.app.state.services


def make_settings(
    tmp_path: Path, model_dir: Path, database_url: str | None = None, **overrides: Any
) -> Settings:
    values: dict[str, Any] = {
        "data_dir": tmp_path,
        "database_url": database_url or f"sqlite:///{tmp_path}/private-gpt.db",
        "model_id": str(model_dir),
        "device": "cpu",
        "max_new_tokens": 48,
        "secret_key": "test-secret-key-" + "x" * 32,
    }
    values.update(overrides)
    from app.config import Settings

    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[LiveServer]:
    """A server whose replies are short (48 tokens): for flows that wait for the end."""
    live = LiveServer(make_settings(tmp_path_factory.mktemp("server"), tiny_model_dir)).start()
    yield live
    live.stop()


@pytest.fixture(scope="session")
def long_server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[LiveServer]:
    """A server whose replies run for thousands of tokens: for stop, reconnect and reload."""
    settings = make_settings(tmp_path_factory.mktemp("long"), tiny_model_dir, max_new_tokens=4000)
    live = LiveServer(settings).start()
    yield live
    live.stop()


# -- users and their HTTP sessions -----------------------------------------------------------------


def with_db(settings: Settings, work: Callable[[AsyncSession], Awaitable[T]]) -> T:
    """Run `work` with a database session of its own, from synchronous test code."""
    from app.db import create_engine, create_sessionmaker

    async def run() -> T:
        engine = create_engine(settings.sqlalchemy_url)
        try:
            async with create_sessionmaker(engine)() as db:
                return await work(db)
        finally:
            await engine.dispose()

    # In a thread of its own: Playwright's sync API keeps an event loop running in this one.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, run()).result()


def create_user(settings: Settings, email: str, *, admin: bool = False) -> None:
    from app.auth import service as auth
    from app.models import Role

    role = Role.ADMIN if admin else Role.USER
    with_db(settings, lambda db: auth.create_user(db, email=email, password=PASSWORD, role=role))


def create_api_key(settings: Settings, email: str) -> str:
    from app.auth import service as auth

    async def create(db: AsyncSession) -> str:
        user = await auth.get_user_by_email(db, email)
        assert user is not None
        key, _ = await auth.create_api_key(db, user=user, secret=settings.secret())
        return key

    return with_db(settings, create)


def load_message(settings: Settings, message_id: str) -> Any:
    from app.models import Message

    return with_db(settings, lambda db: db.get(Message, uuid.UUID(message_id)))


def wait_for_message(settings: Settings, message_id: str, *, timeout: float = 60) -> Any:
    """Poll the database until the reply is no longer streaming; returns the stored message."""
    deadline = time.monotonic() + timeout
    while True:
        message = load_message(settings, message_id)
        if message is not None and message.status.value != "streaming":
            return message
        if time.monotonic() > deadline:
            raise AssertionError(f"reply {message_id} still streaming after {timeout} s")
        time.sleep(0.1)


@dataclass
class Member:
    """A signed-in user's HTTP client: cookies plus the page's CSRF token on every POST."""

    client: httpx.Client
    csrf: str
    email: str

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        headers = {"X-CSRF-Token": self.csrf, "HX-Request": "true", **kwargs.pop("headers", {})}
        return self.client.post(url, headers=headers, **kwargs)

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.client.get(url, **kwargs)

    def start_chat(self, message: str) -> str:
        """Send the first message of a new conversation; returns the conversation's id."""
        response = self.post("/c", data={"message": message})
        assert response.status_code == 204, response.text
        return response.headers["HX-Redirect"].rsplit("/", 1)[-1]


def sign_in(server: LiveServer, email: str) -> Member:
    import httpx

    client = httpx.Client(base_url=server.url, timeout=60)
    page = client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert token, page.text
    response = client.post(
        "/login", data={"email": email, "password": PASSWORD, "csrf_token": token.group(1)}
    )
    assert response.status_code == 303, response.text
    home = client.get("/")
    csrf = re.search(r'"X-CSRF-Token": "([^"]+)"', home.text)
    assert csrf, home.text
    return Member(client=client, csrf=csrf.group(1), email=email)


@pytest.fixture
def member_factory() -> Iterator[Any]:
    """Create users on a server and sign them in: `member_factory(server)` -> Member."""
    members: list[Member] = []

    def make(live: LiveServer, *, admin: bool = False) -> Member:
        email = f"user-{uuid.uuid4().hex[:8]}@example.com"
        create_user(live.settings, email, admin=admin)
        member = sign_in(live, email)
        members.append(member)
        return member

    yield make
    for member in members:
        member.client.close()


def elements(markup: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """Every element the browser would build from `markup`, with its attributes."""
    found: list[tuple[str, list[tuple[str, str]]]] = []

    class Collector(HTMLParser):
        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            found.append((tag, [(name, value or "") for name, value in attrs]))

    Collector().feed(markup)
    return found


# -- adapters ----------------------------------------------------------------------------------------

FALCON_TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")


def build_adapter(
    base_dir: Path,
    out_dir: Path,
    *,
    seed: int = 1,
    rank: int = 4,
    alpha: int = 8,
    targets: tuple[str, ...] = FALCON_TARGETS,
    scale: float = 0.5,
) -> Path:
    """A real PEFT LoRA adapter for the tiny model, saved as PEFT saves it (config + safetensors).

    Its B matrices are random (not PEFT's zero init), so it changes the model's output as a
    trained adapter would.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, task_type="CAUSAL_LM"
    )
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, scale)
    model.save_pretrained(out_dir)
    return out_dir


def zip_directory(directory: Path, archive: Path) -> Path:
    """A .zip of the files in `directory`, as an admin would upload it."""
    import zipfile

    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as out:
        for path in sorted(directory.iterdir()):
            out.write(path, path.name)
    return archive


@dataclass
class Admin:
    """An admin with an API key, driving the registry through its JSON API."""

    server: LiveServer
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def upload(self, name: str, archive: Path, notes: str = "") -> httpx.Response:
        import httpx

        with archive.open("rb") as file:
            return httpx.post(
                f"{self.server.url}/api/admin/adapters/{name}/versions",
                headers=self.headers,
                files={"file": (archive.name, file, "application/zip")},
                data={"notes": notes},
                timeout=120,
            )

    def act(self, name: str, version: int, action: str) -> httpx.Response:
        import httpx

        url = f"{self.server.url}/api/admin/adapters/{name}/versions/{version}/{action}"
        return httpx.post(url, headers=self.headers, timeout=60)

    def set_default(self, name: str | None) -> httpx.Response:
        import httpx

        return httpx.put(
            f"{self.server.url}/api/admin/default-adapter", headers=self.headers, json={"name": name}
        )


def make_admin(server: LiveServer) -> Admin:
    email = f"admin-{uuid.uuid4().hex[:8]}@example.com"
    create_user(server.settings, email, admin=True)
    return Admin(server, create_api_key(server.settings, email))
