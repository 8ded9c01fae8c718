"""Index a client's conversations by (updated_at, id), the order and cursor of the listing.

With only an index on `client`, listing the newest page of a client with thousands of
conversations sorted all of them; this index serves each page (`?before=`) as a range scan.

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_conversations_client_updated_at_id", "conversations", ["client", "updated_at", "id"]
    )
    op.drop_index("ix_conversations_client", table_name="conversations")


def downgrade() -> None:
    op.create_index("ix_conversations_client", "conversations", ["client"])
    op.drop_index("ix_conversations_client_updated_at_id", table_name="conversations")
