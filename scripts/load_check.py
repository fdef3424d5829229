"""Load check: many concurrent streaming clients against a real server, then the database is audited.

    .venv/bin/python scripts/load_check.py                      # 200 clients, a server of its own (SQLite)
    .venv/bin/python scripts/load_check.py --database-url postgresql://postgres@127.0.0.1:5432/postgres
    .venv/bin/python scripts/load_check.py --clients 50 --requests 2 --json load.json
    .venv/bin/python scripts/load_check.py --url http://127.0.0.1:8000 --server-pid PID   # a running server

It starts `python -m app serve` on loopback (the embedded demo model unless --model-id, in a fresh
DATA_DIR; on PostgreSQL in a fresh database it creates and drops; or loads the server at --url, run
with that server's environment), creates users, sign-in
sessions and API keys with the app's own data functions, then runs N clients at once, half of them
browsers (send a chat message, tail the reply over SSE, send the next one in the same conversation)
and half OpenAI API clients (streamed /v1/chat/completions). Each client makes a few short requests
and waits Retry-After when refused; the run stops by itself at the deadline. Afterwards it checks:

- every request either completed or was refused with 429/503 and a Retry-After header; no 5xx;
- every chat message the server accepted is stored exactly once, followed by its reply, finished
  (complete, or failed/interrupted with its error); no refused message is stored; nothing is left
  "streaming";
- the server's resident memory (VmRSS) before the load, right after it, and after a settle period.

It prints a table and writes the figures as JSON (--json). docs/reliability.md records a run.
tests/test_reliability.py runs a smaller one through these functions.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a file: `python scripts/load_check.py`
    sys.path.insert(0, str(ROOT))

REFUSAL_STATUSES = (429, 503)
_REPLY_ID = re.compile(r'id="msg-([0-9a-f-]{36})" class="message assistant')


# -- the server ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mib(pid: int) -> float:
    """The process's resident set (VmRSS), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class ServerProcess:
    """`python -m app serve` in a process of its own, configured by environment variables."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = {**os.environ, **env}
        self.port = int(env.get("PORT") or free_port())
        self.env["PORT"] = str(self.port)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 120) -> ServerProcess:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app", "serve"],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited ({self.process.returncode}): {self.log_tail()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"the server was not ready after {timeout} s: {self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def readyz(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.url}/readyz", timeout=10).json())

    def rss_mib(self) -> float:
        return rss_mib(self.pid)

    def kill(self) -> None:
        """SIGKILL: no shutdown handler runs, as when the machine loses power or the OOM killer strikes."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


class RunningServer:
    """A server started elsewhere (--url); its memory is read when its process id is given."""

    def __init__(self, url: str, pid: int | None) -> None:
        self.url, self.server_pid = url.rstrip("/"), pid

    def readyz(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.url}/readyz", timeout=10).json())

    def rss_mib(self) -> float:
        return rss_mib(self.server_pid) if self.server_pid else float("nan")


def server_env(
    *, data_dir: Path, database_url: str, model_id: str = "", max_tokens: int = 8, **extra: str
) -> dict[str, str]:
    """The environment of a server for a check: CPU, no demo-adapter training, short chat replies."""
    return {
        "DATA_DIR": str(data_dir),
        "DATABASE_URL": database_url,
        "MODEL_ID": model_id,
        "DEVICE": "cpu",
        "DEMO_ADAPTER": "false",
        "SECRET_KEY": "load-check-secret-" + "k" * 32,
        "MAX_NEW_TOKENS": str(max_tokens),
        "HOST": "127.0.0.1",
        **extra,
    }


# -- users -----------------------------------------------------------------------------------------


def _settings(env: dict[str, str]) -> Any:
    """The server's settings that matter here: where its database is, and its secret key."""
    from pydantic import SecretStr

    from app.config import Settings

    return Settings(  # type: ignore[call-arg]
        _env_file=None,
        data_dir=Path(env["DATA_DIR"]),
        database_url=env["DATABASE_URL"],
        secret_key=SecretStr(env["SECRET_KEY"]),
    )


@dataclass(frozen=True)
class Credentials:
    user_id: int
    email: str
    session_token: str  # the browser's cookie
    csrf: str
    api_key: str


def create_credentials(env: dict[str, str], count: int, *, users: int) -> list[Credentials]:
    """`count` sign-ins (a session and an API key each) spread over `users` accounts, made with the
    app's own data functions (as `python -m app create-user` / `create-api-key` and a sign-in do)."""
    from app.migrate import upgrade_database

    settings = _settings(env)
    upgrade_database(settings.sqlalchemy_url)

    async def create() -> list[Credentials]:
        from datetime import timedelta

        from app.auth import service as auth
        from app.db import create_engine, create_sessionmaker

        engine = create_engine(settings.sqlalchemy_url)
        made: list[Credentials] = []
        try:
            async with create_sessionmaker(engine)() as db:
                accounts = []
                for _ in range(max(1, min(users, count))):
                    email = f"load-{uuid.uuid4().hex[:10]}@example.com"
                    accounts.append(await auth.create_user(db, email=email, password=uuid.uuid4().hex))
                for index in range(count):
                    user = accounts[index % len(accounts)]
                    token, session = await auth.start_session(
                        db, user=user, secret=settings.secret(), ttl=timedelta(hours=2)
                    )
                    key, _ = await auth.create_api_key(db, user=user, secret=settings.secret(), name="load")
                    made.append(Credentials(user.id, user.email, token, session.csrf_token, key))
        finally:
            await engine.dispose()
        return made

    return asyncio.run(create())


# -- the clients -----------------------------------------------------------------------------------


@dataclass
class RequestRecord:
    client: int
    kind: str  # "chat" or "api"
    outcome: str = "error"  # completed, refused, failed (accepted but did not complete), error
    status: int | None = None
    retry_after: str | None = None
    detail: str = ""
    ttft_s: float | None = None
    total_s: float | None = None
    # Chat only: what was sent, where, and the reply's final status as the stream reported it.
    text: str | None = None
    conversation: str | None = None
    reply_status: str | None = None


@dataclass
class LoadConfig:
    clients: int = 200
    requests: int = 3  # attempts per client (a refused one counts)
    max_tokens: int = 8
    api_share: float = 0.5  # the share of clients that use the OpenAI API rather than the chat
    deadline_s: float = 150.0  # no new request after this; what is still running then is an error
    retry_after_cap_s: float = 5.0  # a refused client waits Retry-After, at most this long
    users: int = 20  # accounts the clients are spread over
    model: str = ""  # the `model` API clients send; empty: the served base model


async def _read_sse(response: httpx.Response) -> AsyncIterator[tuple[str, str]]:
    """Yield (event, data) as they arrive."""
    event, data = "message", list[str]()
    async for line in response.aiter_lines():
        if line == "":
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))


def _refusal(record: RequestRecord, response: httpx.Response) -> None:
    record.status = response.status_code
    record.retry_after = response.headers.get("retry-after")
    if response.status_code in REFUSAL_STATUSES:
        record.outcome = "refused" if record.retry_after else "error"
        record.detail = "" if record.retry_after else f"{response.status_code} without Retry-After"
    else:
        record.outcome = "error"
        record.detail = f"HTTP {response.status_code}: {response.text[:200]}"


async def _chat_request(
    client: httpx.AsyncClient, record: RequestRecord, creds: Credentials, conversation: str | None
) -> str | None:
    """One chat send and its reply, as the page does it; returns the conversation to continue."""
    headers = {"X-CSRF-Token": creds.csrf, "HX-Request": "true"}
    started = time.monotonic()
    if conversation is None:
        response = await client.post("/c", data={"message": record.text}, headers=headers)
        if response.status_code != 204:
            _refusal(record, response)
            return None
        conversation = response.headers["HX-Redirect"].rsplit("/", 1)[-1]
        page = await client.get(f"/c/{conversation}")
        replies = _REPLY_ID.findall(page.text)
    else:
        response = await client.post(
            f"/c/{conversation}/messages", data={"message": record.text}, headers=headers
        )
        if response.status_code != 200:
            _refusal(record, response)
            return conversation
        replies = _REPLY_ID.findall(response.text)
    record.status = response.status_code
    record.conversation = conversation
    if not replies:
        record.detail = "accepted, but the page shows no reply"
        return conversation
    url = f"/c/{conversation}/messages/{replies[-1]}/stream"
    async with client.stream("GET", url, headers={"Accept": "text/event-stream"}) as stream:
        if stream.status_code != 200:
            record.detail = f"stream HTTP {stream.status_code}"
            return conversation
        async for event, data in _read_sse(stream):
            if event == "token" and record.ttft_s is None:
                record.ttft_s = time.monotonic() - started
            elif event == "done":
                record.reply_status = data
                break
    record.total_s = time.monotonic() - started
    if record.reply_status == "complete":
        record.outcome = "completed"
    elif record.reply_status is None:
        record.detail = "the stream ended without its done event"
    else:
        record.outcome = "failed"
        record.detail = f"reply {record.reply_status}"
    return conversation


async def _api_request(
    client: httpx.AsyncClient, record: RequestRecord, creds: Credentials, config: LoadConfig, model: str
) -> None:
    body = {
        "model": config.model or model,
        "messages": [{"role": "user", "content": record.text}],
        "max_tokens": config.max_tokens,
        "stream": True,
    }
    started = time.monotonic()
    headers = {"Authorization": f"Bearer {creds.api_key}"}
    async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
        if response.status_code != 200:
            await response.aread()
            _refusal(record, response)
            return
        record.status = 200
        finish, done = None, False
        async for _, data in _read_sse(response):
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                record.detail = f"error in the stream: {chunk['error'].get('message')}"
                record.outcome = "failed"
                continue
            for choice in chunk.get("choices", []):
                if choice["delta"].get("content") and record.ttft_s is None:
                    record.ttft_s = time.monotonic() - started
                finish = choice.get("finish_reason") or finish
    record.total_s = time.monotonic() - started
    if done and finish in ("stop", "length") and record.outcome != "failed":
        record.outcome = "completed"
    elif record.outcome != "failed":
        record.detail = f"stream ended (done={done}, finish_reason={finish})"


async def _client(
    index: int, creds: Credentials, url: str, config: LoadConfig, model: str, run_id: str, deadline: float
) -> list[RequestRecord]:
    kind = "api" if index < round(config.clients * config.api_share) else "chat"
    records: list[RequestRecord] = []
    conversation: str | None = None
    timeout = httpx.Timeout(connect=30, read=60, write=30, pool=30)
    cookies = {"pgpt_session": creds.session_token}
    # uvicorn closes a connection idle for 5 s; a client that reused one just then (after waiting out
    # a Retry-After) would race the close and lose its POST. Browsers retry those; here the client
    # simply does not keep idle connections that long.
    limits = httpx.Limits(keepalive_expiry=2.0)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, cookies=cookies, limits=limits) as client:
        for attempt in range(config.requests):
            if time.monotonic() >= deadline:
                break
            record = RequestRecord(index, kind, text=f"load {run_id} client {index} request {attempt}")
            records.append(record)
            try:
                if kind == "chat":
                    conversation = await _chat_request(client, record, creds, conversation)
                else:
                    await _api_request(client, record, creds, config, model)
            except (httpx.HTTPError, json.JSONDecodeError, KeyError) as error:
                record.outcome = "error"
                record.detail = f"{type(error).__name__}: {error}"
            if record.outcome == "refused":
                wait = min(float(record.retry_after or 1), config.retry_after_cap_s)
                await asyncio.sleep(wait * (0.5 + (index % 10) / 10))  # spread the retries
    return records


async def run_clients(
    url: str, credentials: list[Credentials], config: LoadConfig, model: str
) -> list[RequestRecord]:
    """Run the clients at once (every one has connected before the first sends); stops at the deadline."""
    run_id = uuid.uuid4().hex[:8]
    deadline = time.monotonic() + config.deadline_s
    tasks = [
        asyncio.create_task(_client(i, credentials[i], url, config, model, run_id, deadline))
        for i in range(config.clients)
    ]
    grace = 90.0  # a request started just before the deadline may finish
    done, pending = await asyncio.wait(tasks, timeout=config.deadline_s + grace)
    for task in pending:
        task.cancel()
    records: list[RequestRecord] = []
    for task in tasks:
        if task in done and task.exception() is None:
            records.extend(task.result())
        else:
            records.append(
                RequestRecord(tasks.index(task), "?", detail="the client did not finish by the deadline")
            )
    return records


# -- the audit ---------------------------------------------------------------------------------------


@dataclass
class DatabaseAudit:
    accepted_messages: int = 0  # chat messages the server accepted (the client got 200/204)
    stored_once: int = 0
    lost: int = 0  # accepted but not stored
    duplicated: int = 0  # stored more than once
    refused_but_stored: int = 0
    replies_missing: int = 0  # a stored message with no reply after it
    replies_unfinished: int = 0  # a reply still "streaming" after the run
    replies_not_as_streamed: int = 0  # the stored status differs from the stream's `done` event
    problems: list[str] = field(default_factory=list)


def audit_database(env: dict[str, str], records: list[RequestRecord], user_ids: set[int]) -> DatabaseAudit:
    """Read back every message of the load's users and hold it against what the clients saw."""
    from sqlalchemy import select

    from app.db import create_engine, create_sessionmaker
    from app.models import Conversation, Message, MessageRole

    async def load() -> list[tuple[Any, ...]]:
        engine = create_engine(_settings(env).sqlalchemy_url)
        try:
            async with create_sessionmaker(engine)() as db:
                query = (
                    select(
                        Message.conversation_id,
                        Message.position,
                        Message.role,
                        Message.content,
                        Message.status,
                    )
                    .join(Conversation)
                    .where(Conversation.user_id.in_(user_ids))
                )
                return [tuple(row) for row in (await db.execute(query)).all()]
        finally:
            await engine.dispose()

    rows = asyncio.run(load())
    by_position = {(str(c), p): (role, content, status) for c, p, role, content, status in rows}
    user_rows: dict[str, list[tuple[str, int]]] = {}
    for c, p, role, content, _ in rows:
        if role is MessageRole.USER:
            user_rows.setdefault(content, []).append((str(c), p))
    audit = DatabaseAudit()
    audit.replies_unfinished = sum(1 for *_, status in rows if status.value == "streaming")
    for record in records:
        if record.kind != "chat" or record.text is None:
            continue
        stored = user_rows.get(record.text, [])
        accepted = record.status in (200, 204)
        if not accepted:
            if stored:
                audit.refused_but_stored += 1
                audit.problems.append(f"refused yet stored: {record.text!r}")
            continue
        audit.accepted_messages += 1
        if not stored:
            audit.lost += 1
            audit.problems.append(f"lost: {record.text!r}")
            continue
        if len(stored) > 1:
            audit.duplicated += 1
            audit.problems.append(f"stored {len(stored)} times: {record.text!r}")
            continue
        audit.stored_once += 1
        conversation, position = stored[0]
        reply = by_position.get((conversation, position + 1))
        if reply is None or reply[0] is not MessageRole.ASSISTANT:
            audit.replies_missing += 1
            audit.problems.append(f"no reply after: {record.text!r}")
        elif record.reply_status is not None and reply[2].value != record.reply_status:
            audit.replies_not_as_streamed += 1
            audit.problems.append(
                f"reply to {record.text!r} stored {reply[2].value}, streamed {record.reply_status}"
            )
    return audit


# -- figures -----------------------------------------------------------------------------------------


def percentiles(values: list[float]) -> dict[str, float | None]:
    ordered = sorted(values)

    def pick(q: float) -> float | None:
        if not ordered:
            return None
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)

    return {"p50_ms": pick(0.5), "p90_ms": pick(0.9), "p99_ms": pick(0.99), "max_ms": pick(1.0)}


def summarize(records: list[RequestRecord]) -> dict[str, Any]:
    outcomes = Counter(r.outcome for r in records)
    statuses = Counter(str(r.status) for r in records)
    by_kind = {kind: dict(Counter(r.outcome for r in records if r.kind == kind)) for kind in ("chat", "api")}
    completed = [r for r in records if r.outcome == "completed"]
    return {
        "requests": len(records),
        "completed": outcomes["completed"],
        "refused": outcomes["refused"],
        "failed": outcomes["failed"],
        "errors": outcomes["error"],
        "server_errors_5xx": sum(
            1 for r in records if r.status is not None and r.status >= 500 and r.status != 503
        ),
        "refused_without_retry_after": sum(
            1 for r in records if r.status in REFUSAL_STATUSES and not r.retry_after
        ),
        "statuses": dict(statuses),
        "by_kind": by_kind,
        "ttft": percentiles([r.ttft_s for r in completed if r.ttft_s is not None]),
        "total": percentiles([r.total_s for r in completed if r.total_s is not None]),
        "error_details": dict(
            Counter(r.detail for r in records if r.outcome in ("error", "failed")).most_common(10)
        ),
    }


@dataclass
class LoadReport:
    config: dict[str, Any]
    server: dict[str, Any]
    wall_s: float
    summary: dict[str, Any]
    audit: DatabaseAudit
    rss_mib: dict[str, Any]  # before the load, after each round, settled after each round

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        s, a, m = self.summary, self.audit, self.rss_mib
        rows = [
            ("clients", self.config["clients"]),
            ("requests per client per round", self.config["requests"]),
            ("requests", s["requests"]),
            ("completed", s["completed"]),
            ("refused (429/503 + Retry-After)", s["refused"]),
            ("accepted, not completed", s["failed"]),
            ("errors", s["errors"]),
            ("5xx other than 503", s["server_errors_5xx"]),
            ("chat messages accepted", a.accepted_messages),
            ("  stored exactly once", a.stored_once),
            ("  lost / duplicated", f"{a.lost} / {a.duplicated}"),
            ("  refused yet stored", a.refused_but_stored),
            ("  reply missing / unfinished", f"{a.replies_missing} / {a.replies_unfinished}"),
            ("TTFT p50 / p90 / p99 ms", "{p50_ms} / {p90_ms} / {p99_ms}".format(**s["ttft"])),
            ("total p50 / p90 / p99 ms", "{p50_ms} / {p90_ms} / {p99_ms}".format(**s["total"])),
            ("RSS before the load MiB", m["before"]),
            ("RSS after each round MiB", " / ".join(str(v) for v in m["after"])),
            ("RSS settled after each round MiB", " / ".join(str(v) for v in m["settled"])),
            ("rounds; wall time of the load s", f"{self.config['rounds']}; {self.wall_s:.1f}"),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def run_load_check(
    server: ServerProcess | RunningServer,
    env: dict[str, str],
    config: LoadConfig,
    *,
    rounds: int = 2,
    settle_s: float = 15.0,
) -> LoadReport:
    """Warm the server up, note its memory, run the clients `rounds` times (letting memory settle
    after each), audit the database. A leak shows as growth from one round to the next; the first
    round's growth is the allocator keeping what the peak needed."""
    credentials = create_credentials(env, config.clients, users=config.users)
    ready = server.readyz()
    model = str(ready["served_model_name"])
    warm_up = LoadConfig(clients=4, requests=2, max_tokens=config.max_tokens, users=1, deadline_s=60)
    asyncio.run(run_clients(server.url, credentials[:4], warm_up, model))
    memory: dict[str, Any] = {"before": round(server.rss_mib(), 1), "after": [], "settled": []}
    records: list[RequestRecord] = []
    started = time.monotonic()
    for _ in range(rounds):
        records += asyncio.run(run_clients(server.url, credentials, config, model))
        memory["after"].append(round(server.rss_mib(), 1))
        time.sleep(settle_s)
        memory["settled"].append(round(server.rss_mib(), 1))
    wall = time.monotonic() - started - rounds * settle_s
    audit = audit_database(env, records, {c.user_id for c in credentials})
    server_facts = {
        key: ready.get(key) for key in ("served_model_name", "device", "quantization", "demo_model")
    }
    server_facts["database"] = env["DATABASE_URL"].split(":", 1)[0]
    server_facts["cpu_cores"] = os.cpu_count()
    server_facts["settings"] = {
        k: env[k] for k in ("MAX_RUNNING_GENERATIONS", "MAX_QUEUED_GENERATIONS", "MAX_NEW_TOKENS") if k in env
    }
    config_facts = {**asdict(config), "rounds": rounds, "settle_s": settle_s}
    return LoadReport(config_facts, server_facts, round(wall, 2), summarize(records), audit, memory)


@contextlib.contextmanager
def postgres_database(admin_url: str) -> Iterator[str]:
    """A fresh PostgreSQL database beside `admin_url`'s, dropped afterwards."""
    import psycopg

    name = f"pgpt_load_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{admin_url.rsplit('/', 1)[0]}/{name}"
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = LoadConfig()
    parser.add_argument("--clients", type=int, default=defaults.clients)
    parser.add_argument("--requests", type=int, default=defaults.requests, help="attempts per client")
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens)
    parser.add_argument("--deadline", type=float, default=defaults.deadline_s, help="seconds")
    parser.add_argument("--users", type=int, default=defaults.users)
    parser.add_argument(
        "--rounds", type=int, default=2, help="load rounds (a leak grows from one to the next)"
    )
    parser.add_argument(
        "--settle", type=float, default=15.0, help="seconds to let memory settle after a round"
    )
    parser.add_argument(
        "--database-url",
        default="",
        help="PostgreSQL server URL: the check runs in a fresh database beside it. Default: SQLite.",
    )
    parser.add_argument("--model-id", default="", help="default: the embedded demo model")
    parser.add_argument("--max-running", type=int, help="MAX_RUNNING_GENERATIONS (default: the server's)")
    parser.add_argument("--max-queued", type=int, help="MAX_QUEUED_GENERATIONS (default: the server's)")
    parser.add_argument(
        "--url",
        help="load a server that is already running instead of starting one; run this with the server's "
        "own environment (DATABASE_URL, DATA_DIR, SECRET_KEY, or its .env): the load's users are created "
        "in its database, and stay",
    )
    parser.add_argument("--server-pid", type=int, help="with --url: the server's process, for its memory")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--server-log", type=Path, help="copy the server's log here")
    args = parser.parse_args(argv)
    config = LoadConfig(
        clients=args.clients,
        requests=args.requests,
        max_tokens=args.max_tokens,
        deadline_s=args.deadline,
        users=args.users,
    )
    extra = {}
    if args.max_running is not None:
        extra["MAX_RUNNING_GENERATIONS"] = str(args.max_running)
    if args.max_queued is not None:
        extra["MAX_QUEUED_GENERATIONS"] = str(args.max_queued)
    if args.url:
        from app.config import get_settings

        settings = get_settings()  # as the server reads them: the environment and .env
        env = {
            "DATA_DIR": str(settings.data_dir),
            "DATABASE_URL": settings.database_url,
            "SECRET_KEY": settings.secret().decode(),
        }
        print(f"{config.clients} clients against {args.url} ...", file=sys.stderr, flush=True)
        target = RunningServer(args.url, args.server_pid)
        report = run_load_check(target, env, config, rounds=args.rounds, settle_s=args.settle)
        return _report(report, args.json)
    with contextlib.ExitStack() as stack:
        data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="load-check-")))
        if args.database_url:
            database_url = stack.enter_context(postgres_database(args.database_url))
        else:
            database_url = f"sqlite:///{data_dir}/private-gpt.db"
        env = server_env(
            data_dir=data_dir,
            database_url=database_url,
            model_id=args.model_id,
            max_tokens=args.max_tokens,
            **extra,
        )
        server = ServerProcess(env, data_dir / "server.log")
        print(f"starting the server ({database_url.split(':', 1)[0]}) ...", file=sys.stderr, flush=True)
        server.start()
        stack.callback(server.stop)
        print(f"{config.clients} clients, {config.requests} requests each ...", file=sys.stderr, flush=True)
        try:
            report = run_load_check(server, env, config, rounds=args.rounds, settle_s=args.settle)
        finally:
            if args.server_log:
                args.server_log.write_bytes(server.log_path.read_bytes())
    return _report(report, args.json)


def _report(report: LoadReport, json_path: Path | None) -> int:
    """Print the table (and any problem), write the JSON; 0 when nothing went wrong."""
    print(report.table())
    if report.audit.problems:
        print("\n".join(report.audit.problems[:20]))
    if report.summary["error_details"]:
        print(json.dumps(report.summary["error_details"], indent=2))
    if json_path:
        json_path.write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    ok = (
        report.summary["errors"] == 0
        and report.summary["server_errors_5xx"] == 0
        and not report.audit.problems
        and report.audit.replies_unfinished == 0
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
