"""The store: the only part of the package that imports SQLAlchemy and the
database drivers. The runs table is the queue; every state change is one
compare-and-set statement with its history.
"""

from .dialect import safe_url
from .migrations import SCHEMA_VERSION
from .rows import DeliveryRow, HistoryRow, RunRow
from .schema import history, runs, schema_table
from .store import Store
from .submits import MAP_CHUNK, NOTIFY_CHANNEL

__all__ = [
    "MAP_CHUNK",
    "NOTIFY_CHANNEL",
    "SCHEMA_VERSION",
    "DeliveryRow",
    "HistoryRow",
    "RunRow",
    "Store",
    "history",
    "runs",
    "safe_url",
    "schema_table",
]
