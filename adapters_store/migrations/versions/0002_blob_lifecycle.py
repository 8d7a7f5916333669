"""blob lifecycle: adapters.last_version, an index on jobs.checkpoint_sha256

``last_version`` keeps version numbers from being reused once a version can
be deleted (``DELETE /adapters/{name}/versions/{v}``); existing adapters
start from their highest version. The index serves the reference checks
that run before a checkpoint blob is deleted.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 14:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("adapters") as batch_op:
        batch_op.add_column(sa.Column("last_version", sa.Integer(), server_default="0", nullable=False))
    op.execute(
        "UPDATE adapters SET last_version = COALESCE("
        "(SELECT MAX(version) FROM adapter_versions WHERE adapter_versions.adapter_id = adapters.id), 0)"
    )
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.create_index("ix_jobs_checkpoint_sha256", ["checkpoint_sha256"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_index("ix_jobs_checkpoint_sha256")
    with op.batch_alter_table("adapters") as batch_op:
        batch_op.drop_column("last_version")
