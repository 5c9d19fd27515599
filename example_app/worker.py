"""Example 2 of Prefect's background-task examples: a task worker started
from Python (`serve()`).

    python -m example_app.worker http://127.0.0.1:8000/tasks

Same runtime as `python -m fastapi_bgtasks.worker example_app.tasks --url ...`;
start it twice to see two workers share the runs.
"""

from __future__ import annotations

import sys

from .tasks import my_background_task

if __name__ == "__main__":
    my_background_task.serve(url=sys.argv[1] if len(sys.argv) > 1 else None)
