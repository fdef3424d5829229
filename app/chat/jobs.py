"""Generation jobs: a reply being written on the server, independent of any HTTP connection.

A send starts a `GenerationJob`; the browser's SSE stream only tails it. The job keeps every
text delta as a numbered event, so a reconnecting client (`Last-Event-ID`) or a reloaded page
gets exactly the events it has not seen. The job writes the partial reply to the database
every few seconds and the final one when it ends, so a crash loses seconds, not the reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.chat.conversations import INTERRUPTED_ERROR
from app.llm.engine import GenerationResult, GenerationStream
from app.models import Message, MessageStatus
from app.usage import record_tokens

log = logging.getLogger(__name__)

SAVE_EVERY_S = 2.0
# A finished job stays in memory this long, so a client that reconnects late still gets its end.
KEEP_FINISHED_S = 60.0
# The engine stops a reply before its next token; this only bounds a wedged model.
STOP_WAIT_S = 30.0
# A finished reply that cannot be stored (the database unreachable, or every connection busy) is
# tried again this long before it is given up on: it would otherwise stay "streaming" in the
# database, with only the text of its last periodic save.
FINAL_SAVE_RETRY_S = 300.0


class GenerationJob:
    def __init__(self, message_id: uuid.UUID, stream: GenerationStream, user_id: int | None = None) -> None:
        self.message_id = message_id
        self.stream = stream
        self.user_id = user_id  # whose daily token count the reply adds to
        self.chunks: list[str] = []  # event n (1-based) is chunks[n - 1]
        self.status = MessageStatus.STREAMING
        self.error: str | None = None
        self.completion_tokens = 0
        self.result: GenerationResult | None = None
        self.stop_requested = False
        self._changed = asyncio.Condition()
        self._finished = asyncio.Event()

    @property
    def text(self) -> str:
        return "".join(self.chunks)

    @property
    def last_event_id(self) -> int:
        return len(self.chunks)

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    def snapshot(self) -> tuple[str, int]:
        """The text so far and the id of its last event, taken together."""
        return self.text, len(self.chunks)

    async def stop(self) -> None:
        """Cancel the generation on the model and wait until the partial reply is stored."""
        self.stop_requested = True
        self.stream.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._finished.wait(), STOP_WAIT_S)

    async def wait(self) -> None:
        await self._finished.wait()

    async def tail(self, after: int = 0) -> AsyncIterator[tuple[int, str]]:
        """Yield (last event id, text of the events after `after`) until the job ends.

        Events that piled up while the client was busy are sent as one, so a slow client
        costs one write per wake-up rather than one per token.
        """
        sent = max(0, after)
        while True:
            await self._wait_for_more(sent)
            upto = len(self.chunks)
            if upto > sent:
                yield upto, "".join(self.chunks[sent:upto])
                sent = upto
            elif self.finished:
                return

    async def _wait_for_more(self, seen: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: len(self.chunks) > seen or self.finished)

    async def _append(self, text: str) -> None:
        async with self._changed:
            self.chunks.append(text)
            self._changed.notify_all()

    async def _finish(self) -> None:
        async with self._changed:
            self._finished.set()
            self._changed.notify_all()


class JobManager:
    """Runs generation jobs as tasks on the event loop and stores what they write."""

    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession]) -> None:
        self.sessionmaker = sessionmaker
        self._jobs: dict[uuid.UUID, GenerationJob] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def get(self, message_id: uuid.UUID) -> GenerationJob | None:
        return self._jobs.get(message_id)

    def start(
        self, message_id: uuid.UUID, stream: GenerationStream, *, user_id: int | None = None
    ) -> GenerationJob:
        job = GenerationJob(message_id, stream, user_id)
        self._jobs[message_id] = job
        task = asyncio.create_task(self._run(job), name=f"generation-job-{message_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    async def shutdown(self) -> None:
        """Cancel every running job; each stores its partial reply as interrupted."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _run(self, job: GenerationJob) -> None:
        last_save = time.monotonic()
        try:
            async for delta in job.stream:
                job.completion_tokens = delta.completion_tokens
                await job._append(delta.text)
                if time.monotonic() - last_save >= SAVE_EVERY_S:
                    await self._save(job)
                    last_save = time.monotonic()
            job.result = job.stream.result
            job.status, job.error = _outcome(job)
        except asyncio.CancelledError:  # the server is shutting down
            job.stream.cancel()
            job.status, job.error = MessageStatus.INTERRUPTED, INTERRUPTED_ERROR
            await asyncio.shield(self._save(job))
            await asyncio.shield(self._record_usage(job))
            await job._finish()
            raise
        except Exception as error:
            log.exception("generation job %s failed", job.message_id)
            job.stream.cancel()
            job.status, job.error = MessageStatus.FAILED, f"{type(error).__name__}: {error}"
        await self._save_final(job)
        await self._record_usage(job)
        await job._finish()
        asyncio.get_running_loop().call_later(KEEP_FINISHED_S, self._jobs.pop, job.message_id, None)

    async def _record_usage(self, job: GenerationJob) -> None:
        """Add the reply's tokens to its user's day, once, when it ends (however it ends)."""
        if job.user_id is None:
            return
        if (result := job.result) is not None:
            prompt, completion = result.prompt_tokens, result.completion_tokens
        else:  # cut off by a shutdown: the prompt was read, and this much was written
            prompt, completion = len(job.stream.request.prompt_ids), job.completion_tokens
        try:
            await record_tokens(
                self.sessionmaker, user_id=job.user_id, prompt_tokens=prompt, completion_tokens=completion
            )
        except Exception:
            log.exception("could not count the tokens of generation job %s", job.message_id)

    async def _save_final(self, job: GenerationJob) -> None:
        """Store the finished reply, retrying while the database does not take it; only then do
        its streams end (`done` makes the page fetch the stored reply)."""
        deadline = time.monotonic() + FINAL_SAVE_RETRY_S
        wait = 0.5
        while not await self._save(job) and time.monotonic() < deadline:
            await asyncio.sleep(wait)
            wait = min(wait * 2, 10.0)

    async def _save(self, job: GenerationJob) -> bool:
        """Store the reply as it is now; False when the database did not take it (logged)."""
        try:
            async with self.sessionmaker() as db:
                message = await db.get(Message, job.message_id)
                if message is None:  # the conversation was deleted meanwhile
                    return True
                message.content = job.text
                message.status = job.status
                message.error = job.error
                message.completion_tokens = job.completion_tokens
                if (result := job.result) is not None:
                    message.finish_reason = (
                        result.finish_reason if result.finish_reason in ("stop", "length") else None
                    )
                    message.completion_tokens = result.completion_tokens
                    message.prompt_tokens = result.prompt_tokens
                    message.duration_ms = round(result.duration_s * 1000)
                    if result.time_to_first_token_s is not None:
                        message.time_to_first_token_ms = round(result.time_to_first_token_s * 1000)
                await db.commit()
        except Exception:
            log.exception("could not store the reply of generation job %s", job.message_id)
            return False
        return True


def _outcome(job: GenerationJob) -> tuple[MessageStatus, str | None]:
    """The stored status of a finished job, and the error to show with it."""
    assert job.result is not None
    reason = job.result.finish_reason
    if reason == "cancelled":
        return (
            (MessageStatus.STOPPED, None)
            if job.stop_requested
            else (MessageStatus.INTERRUPTED, INTERRUPTED_ERROR)
        )
    if reason == "error":
        return MessageStatus.FAILED, job.result.error or "the generation failed"
    return MessageStatus.COMPLETE, None
