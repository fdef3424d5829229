"""limits: adapters restricted to groups, rate limits and token quotas, usage counted per user and day

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28 10:45:00.000000

"""

from collections.abc import Sequence

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    # Existing adapters stay open to everyone (an empty list), existing users and keys follow the
    # settings (NULL overrides).
    with op.batch_alter_table("adapters", schema=None) as batch_op:
        batch_op.add_column(sa.Column("allowed_groups", sa.JSON(), nullable=False, server_default=sa.text("'[]'")))
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.add_column(sa.Column("rate_limit_per_minute", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("daily_token_quota", sa.BigInteger(), nullable=True))
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("rate_limit_per_minute", sa.Integer(), nullable=True))
    op.create_table(
        "rate_windows",
        sa.Column("subject", sa.String(length=32), nullable=False),
        sa.Column("minute", sa.BigInteger(), nullable=False),
        sa.Column("requests", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("subject", "minute", name=op.f("pk_rate_windows")),
    )
    op.create_table(
        "daily_usage",
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("requests", sa.Integer(), nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
        sa.Column("completion_tokens", sa.BigInteger(), nullable=False),
        sa.Column("last_request_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_daily_usage_user_id_users"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("user_id", "day", name=op.f("pk_daily_usage")),
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_table("daily_usage")
    op.drop_table("rate_windows")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_column("rate_limit_per_minute")
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_column("daily_token_quota")
        batch_op.drop_column("rate_limit_per_minute")
    with op.batch_alter_table("adapters", schema=None) as batch_op:
        batch_op.drop_column("allowed_groups")
