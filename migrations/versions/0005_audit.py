"""audit: the audit log made append-only in the database; sessions remember when and where they were used

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28 11:10:00.000000

"""

from collections.abc import Sequence

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

REFUSAL = "audit_events is append-only: the audit log cannot be changed or deleted"

# Deleting a user sets audit_events.actor_id to NULL (ON DELETE SET NULL; actor_email keeps who it
# was): that one change is let through, every other UPDATE, and every DELETE or TRUNCATE, is refused.
POSTGRES_UP = [
    f"""
    CREATE FUNCTION audit_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'UPDATE' AND OLD.actor_id IS NOT NULL AND NEW.actor_id IS NULL
           AND (NEW.id, NEW.at, NEW.actor_email, NEW.action, NEW.target, NEW.details::text)
               IS NOT DISTINCT FROM (OLD.id, OLD.at, OLD.actor_email, OLD.action, OLD.target, OLD.details::text)
        THEN
            RETURN NEW;
        END IF;
        RAISE EXCEPTION '{REFUSAL} (% refused)', TG_OP USING ERRCODE = 'insufficient_privilege';
    END
    $$
    """,
    "CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE ON audit_events "
    "FOR EACH ROW EXECUTE FUNCTION audit_events_append_only()",
    "CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events "
    "FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only()",
]
POSTGRES_DOWN = [
    "DROP TRIGGER IF EXISTS audit_events_no_truncate ON audit_events",
    "DROP TRIGGER IF EXISTS audit_events_append_only ON audit_events",
    "DROP FUNCTION IF EXISTS audit_events_append_only()",
]
# On SQLite a later migration that alters audit_events in batch mode copies the table, dropping these
# triggers: it must create them again.
SQLITE_UP = [
    f"""
    CREATE TRIGGER audit_events_no_update BEFORE UPDATE ON audit_events
    WHEN NOT (OLD.actor_id IS NOT NULL AND NEW.actor_id IS NULL AND NEW.id IS OLD.id AND NEW.at IS OLD.at
              AND NEW.actor_email IS OLD.actor_email AND NEW.action IS OLD.action
              AND NEW.target IS OLD.target AND NEW.details IS OLD.details)
    BEGIN SELECT RAISE(ABORT, '{REFUSAL} (UPDATE refused)'); END
    """,
    f"""
    CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events
    BEGIN SELECT RAISE(ABORT, '{REFUSAL} (DELETE refused)'); END
    """,
]
SQLITE_DOWN = [
    "DROP TRIGGER IF EXISTS audit_events_no_update",
    "DROP TRIGGER IF EXISTS audit_events_no_delete",
]


def upgrade() -> None:
    """Upgrade schema."""
    # Sessions made before this migration show as last used when they were made.
    with op.batch_alter_table("auth_sessions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(
            sa.Column("client_address", sa.String(length=64), nullable=False, server_default="")
        )
        batch_op.add_column(sa.Column("user_agent", sa.String(length=300), nullable=False, server_default=""))
    postgres = op.get_bind().dialect.name == "postgresql"
    for statement in POSTGRES_UP if postgres else SQLITE_UP:
        op.execute(statement)


def downgrade() -> None:
    """Downgrade schema."""
    postgres = op.get_bind().dialect.name == "postgresql"
    for statement in POSTGRES_DOWN if postgres else SQLITE_DOWN:
        op.execute(statement)
    with op.batch_alter_table("auth_sessions", schema=None) as batch_op:
        batch_op.drop_column("user_agent")
        batch_op.drop_column("client_address")
        batch_op.drop_column("last_seen_at")
