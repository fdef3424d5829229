"""Which server processes share the database now: a starting one must know whether the replies left
"streaming" are its own, cut by its last stop, or another replica's, being written as it starts.

On PostgreSQL every server process holds a shared advisory lock, on a connection of its own, for as
long as it runs (PostgreSQL drops it with the connection, also when the process dies). A starting one
first tries the same lock exclusively: it gets it only when no other process holds it, that is when
it is alone. On SQLite only one server process runs: it is always alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

# pg_advisory_lock's key for "a server process is running": any constant no other code uses.
REPLICA_LOCK_KEY = 0x70677072  # "pgpr"


@dataclass
class ReplicaPresence:
    alone: bool  # no other server process was running when this one joined
    _engine: AsyncEngine | None = None
    _connection: AsyncConnection | None = None

    @classmethod
    async def join(cls, database_url: str) -> ReplicaPresence:
        """Announce this process; `database_url` is the async driver URL (Settings.sqlalchemy_url)."""
        if database_url.startswith("sqlite"):
            return cls(alone=True)
        # Its own unpooled connection: held for the process's life, never lent to a request.
        engine = create_async_engine(database_url, poolclass=NullPool)
        connection = await engine.connect()
        key = {"key": REPLICA_LOCK_KEY}
        alone = bool(await connection.scalar(text("SELECT pg_try_advisory_lock(:key)"), key))
        await connection.execute(text("SELECT pg_advisory_lock_shared(:key)"), key)
        if alone:
            await connection.execute(text("SELECT pg_advisory_unlock(:key)"), key)
        await connection.commit()  # session-level locks outlive the transaction; idle, not idle in one
        return cls(alone=alone, _engine=engine, _connection=connection)

    async def leave(self) -> None:
        if self._connection is not None:
            await self._connection.close()
        if self._engine is not None:
            await self._engine.dispose()
