"""Example 1 of Prefect's background-task examples: a task called in the
foreground is a plain call.

python -m example_app.greeter
"""

from __future__ import annotations

from .tasks import bg


@bg.task
def greet(name: str = "Marvin") -> str:
    message = f"Hello, {name}!"
    print(message)
    return message


if __name__ == "__main__":
    greet()  # runs now, in this process: no worker, no database
