"""The store: the only part of the package that imports SQLAlchemy and the
database drivers. The runs table is the queue; every state change is one
compare-and-set statement with its history.
"""

from .store import (
    MAP_CHUNK,
    NOTIFY_CHANNEL,
    SCHEMA_VERSION,
    Store,
    history,
    runs,
    safe_url,
    schema_table,
)

__all__ = [
    "MAP_CHUNK",
    "NOTIFY_CHANNEL",
    "SCHEMA_VERSION",
    "Store",
    "history",
    "runs",
    "safe_url",
    "schema_table",
]
