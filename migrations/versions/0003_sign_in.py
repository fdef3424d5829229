"""sign-in: approval, display names, groups and account source on users; the method of each session

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28 10:15:00.000000

"""

from collections.abc import Sequence

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

METHODS = ("password", "proxy", "oidc")


def upgrade() -> None:
    """Upgrade schema."""
    # Server defaults fill the rows that exist already: every existing user was made with a
    # password by an admin, so is approved, and every existing session came from the login form.
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.add_column(sa.Column("is_approved", sa.Boolean(), nullable=False, server_default=sa.true()))
        batch_op.add_column(sa.Column("display_name", sa.String(length=200), nullable=False, server_default=""))
        batch_op.add_column(sa.Column("groups", sa.JSON(), nullable=False, server_default=sa.text("'[]'")))
        batch_op.add_column(
            sa.Column(
                "source",
                sa.Enum(*METHODS, name="sign_in_method", native_enum=False, length=16),
                nullable=False,
                server_default="password",
            )
        )
        batch_op.add_column(sa.Column("last_sign_in_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("auth_sessions", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "method",
                sa.Enum(*METHODS, name="session_method", native_enum=False, length=16),
                nullable=False,
                server_default="password",
            )
        )


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("auth_sessions", schema=None) as batch_op:
        batch_op.drop_column("method")
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_column("last_sign_in_at")
        batch_op.drop_column("source")
        batch_op.drop_column("groups")
        batch_op.drop_column("display_name")
        batch_op.drop_column("is_approved")
