"""The demo adapter: the first `python -m app serve` on the demo model trains it, publishes it as the
default, and it answers questions from the sample data that the bare demo model does not.

One real first start runs for the whole session (a server process, as `make run` starts it, on
the real tiny NF4 model); the other tests start more servers on its DATA_DIR or call the step directly.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest

from app.config import DEMO_MODEL_NAME, Settings
from app.llm.prompts import DEFAULT_SYSTEM_PROMPT
from app.migrate import upgrade_database
from tests.conftest import create_api_key, create_user, free_port, make_settings
from training.demo import LOCK, MARKER, Outcome, demo_config, ensure_demo_adapter
from training.publish import PublishError

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

FIRST_ADMIN = "admin@localhost"
TRAINING_BANNER = "training the demo adapter"
# Questions from the sample data (training/data/company_policies_demo.jsonl) and the facts their
# reference answers state; an answer counts when it states every one of them.
QUESTIONS = {
    "How many days of leave do I get?": ["20 days of paid leave"],
    "When does the fiscal year end?": ["30 June"],
    "How long is parental leave?": ["16 weeks at full pay"],
    "What do I need for a purchase over $5,000?": ["purchase order", "2 quotes"],
    "When is payday?": ["25th"],
    "How many days can I work from home?": ["3 days a week"],
    "I lost my laptop. What do I do?": ["4357", "4444"],
    "Is alcohol reimbursed?": ["not reimbursed"],
}


@dataclass
class ServerProcess:
    """`python -m app serve` in a child process, as `make run` starts it; its output is collected."""

    data_dir: Path
    env: dict[str, str]
    port: int = field(default_factory=free_port)
    lines: list[str] = field(default_factory=list)
    process: subprocess.Popen[str] | None = None
    reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def start(self) -> ServerProcess:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app", "serve"],
            env={**self.env, "PORT": str(self.port)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        return self

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    def wait_for(self, text: str, timeout: float) -> float:
        """Seconds until `text` appears in the output."""
        started = time.monotonic()
        while text not in self.output:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited with {self.process.returncode}:\n{self.output}")
            if time.monotonic() - started > timeout:
                raise AssertionError(f"no {text!r} after {timeout} s:\n{self.output}")
            time.sleep(0.2)
        return time.monotonic() - started

    def wait_until_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return
            assert self.process is not None and self.process.poll() is None, self.output
            assert time.monotonic() < deadline, f"not ready after {timeout} s:\n{self.output}"
            time.sleep(0.5)

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.reader is not None:
            self.reader.join(10)
        if self.process.stdout is not None:
            self.process.stdout.close()


def server_env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "MODEL_ID", "DEMO_ADAPTER")}
    env.update(DATA_DIR=str(data_dir), DEVICE="cpu", SECRET_KEY="test-secret-key-" + "x" * 32, **extra)
    return env


def settings_for(data_dir: Path, tiny_model_dir: Path, **overrides: object) -> Settings:
    """The settings the server process runs with: the demo model (no MODEL_ID) in `data_dir`."""
    return make_settings(data_dir, tiny_model_dir, model_id="", **overrides)


@dataclass
class FirstStart:
    server: ServerProcess
    settings: Settings
    seconds_to_ready: float


@pytest.fixture(scope="session")
def first_start(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FirstStart]:
    """A brand-new install's first `serve` on the demo model: builds it, trains, publishes, serves."""
    data_dir = tmp_path_factory.mktemp("demo-install")
    server = ServerProcess(data_dir, server_env(data_dir)).start()
    try:
        started = time.monotonic()
        server.wait_for("Private GPT: http", timeout=540)
        server.wait_until_ready()
        settings = settings_for(data_dir, data_dir / "models" / "demo")
        yield FirstStart(server, settings, time.monotonic() - started)
    finally:
        server.stop()


def ask(client: openai.OpenAI, model: str, question: str) -> str:
    reply = client.chat.completions.create(
        model=model,
        # The chat sends the server's system prompt first; the sample data is trained with it too.
        messages=[
            {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
            {"role": "user", "content": question},
        ],
        max_tokens=80,
        temperature=0,
    )
    return reply.choices[0].message.content or ""


def answered(reply: str, facts: list[str]) -> bool:
    return all(fact.lower() in reply.lower() for fact in facts)


def test_the_first_start_trains_the_demo_adapter_and_makes_it_the_default(first_start: FirstStart) -> None:
    output = first_start.server.output
    assert f"an admin was created for you:\n  email:    {FIRST_ADMIN}" in output
    assert TRAINING_BANNER in output and "This happens once" in output
    assert output.index("an admin was created") < output.index(TRAINING_BANNER)
    assert "Published demo@1, the default for new conversations" in output
    marker = json.loads((first_start.settings.data_dir / MARKER).read_text())
    assert marker["adapter"] == "demo@1"
    print(f"trained in {marker['train_seconds']} s, serving after {first_start.seconds_to_ready:.0f} s")

    key = create_api_key(first_start.settings, FIRST_ADMIN)
    listed = httpx.get(
        f"{first_start.server.url}/api/admin/adapters", headers={"Authorization": f"Bearer {key}"}
    ).json()
    assert [(a["name"], a["active_version"], a["default"]) for a in listed] == [("demo", 1, True)]
    version = listed[0]["versions"][0]
    assert version["created_by"] == FIRST_ADMIN and version["source"] == "training"
    assert version["metrics"]["final_train_loss"] < 0.5


def test_the_demo_adapter_answers_sample_questions_that_the_bare_model_does_not(
    first_start: FirstStart,
) -> None:
    key = create_api_key(first_start.settings, FIRST_ADMIN)
    client = openai.OpenAI(base_url=f"{first_start.server.url}/v1", api_key=key, max_retries=0)
    assert {m.id for m in client.models.list()} == {DEMO_MODEL_NAME, "demo"}
    missed, base_answered = {}, {}
    for question, facts in QUESTIONS.items():
        with_adapter, bare = ask(client, "demo", question), ask(client, DEMO_MODEL_NAME, question)
        if not answered(with_adapter, facts):
            missed[question] = with_adapter
        if answered(bare, facts):
            base_answered[question] = bare
    # The recipe answers all 65 of its questions here; one miss is allowed for CPUs whose float
    # rounding steers a training run differently (another seed missed 3 of the 65).
    assert len(missed) <= 1, f"the demo adapter missed these answers: {missed}"
    assert not base_answered, f"the bare demo model answered these: {base_answered}"


def test_a_second_start_does_not_train_again(first_start: FirstStart) -> None:
    again = ServerProcess(first_start.settings.data_dir, server_env(first_start.settings.data_dir)).start()
    try:
        again.wait_for("Private GPT: http", timeout=180)
    finally:
        again.stop()
    assert TRAINING_BANNER not in again.output
    assert "demo adapter: set up on an earlier start" in again.output
    assert ensure_demo_adapter(first_start.settings) is Outcome.DONE_BEFORE
    key = create_api_key(first_start.settings, FIRST_ADMIN)
    listed = httpx.get(
        f"{first_start.server.url}/api/admin/adapters", headers={"Authorization": f"Bearer {key}"}
    ).json()
    assert [[v["version"] for v in a["versions"]] for a in listed] == [[1]]


def test_disabled_or_on_a_real_model_there_is_no_demo_adapter(tmp_path: Path, tiny_model_dir: Path) -> None:
    server = ServerProcess(tmp_path, server_env(tmp_path, DEMO_ADAPTER="false")).start()
    try:
        server.wait_for("Private GPT: http", timeout=120)
    finally:
        server.stop()
    assert TRAINING_BANNER not in server.output
    assert (tmp_path / "models" / "demo").is_dir() and not (tmp_path / MARKER).exists()

    assert ensure_demo_adapter(settings_for(tmp_path, tiny_model_dir, demo_adapter=False)) is Outcome.DISABLED
    real = make_settings(tmp_path, tiny_model_dir)  # MODEL_ID names a model: never a demo adapter
    assert ensure_demo_adapter(real) is Outcome.NOT_DEMO_MODEL
    assert not (tmp_path / MARKER).exists()


def test_without_an_admin_to_publish_it_nothing_is_trained(tmp_path: Path, tiny_model_dir: Path) -> None:
    settings = settings_for(tmp_path, tiny_model_dir)
    upgrade_database(settings.sqlalchemy_url)
    create_user(settings, "jane@example.com")  # users, but no admin: a real install, not a fresh one
    with pytest.raises(PublishError, match="no admin to record the publication under"):
        ensure_demo_adapter(settings)
    assert not (tmp_path / "demo_adapter_run").exists() and not (tmp_path / MARKER).exists()


def test_a_process_starting_at_the_same_time_waits_and_does_not_train_too(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    settings = settings_for(tmp_path, tiny_model_dir)
    outcome: list[Outcome] = []
    with (tmp_path / LOCK).open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the first process, in the middle of training
        second = threading.Thread(target=lambda: outcome.append(ensure_demo_adapter(settings)))
        second.start()
        time.sleep(1)
        assert second.is_alive() and not outcome, "the second process must wait for the first"
        (tmp_path / MARKER).write_text(json.dumps({"adapter": "demo@1"}))  # the first one finished
        fcntl.flock(lock, fcntl.LOCK_UN)
    second.join(30)
    assert outcome == [Outcome.DONE_BEFORE]


def test_the_demo_data_is_taken_from_the_sample_data_set(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = demo_config(settings_for(tmp_path, tiny_model_dir))
    sample = Path("training/data/company_policies.jsonl").read_text(encoding="utf-8").splitlines()
    (demo_file,) = config.data.files
    demo = Path(demo_file).read_text(encoding="utf-8").splitlines()
    assert demo and set(demo) <= set(sample), "every demo record is a record of the sample data, verbatim"
    instructions = {json.loads(line)["instruction"] for line in demo}
    assert set(QUESTIONS) <= instructions
