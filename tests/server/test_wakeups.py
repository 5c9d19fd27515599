"""In-process wake-ups: a submit wakes the feeds serving its task and no
other; a rescue, a retry or another process's write of unknown tasks wakes
every feed."""

from __future__ import annotations

import anyio

from fastapi_bgtasks.server.wakeups import ANY_TASK, Wakeups


def _fired(events: list[anyio.Event]) -> bool:
    return any(event.is_set() for event in events)


def test_a_submit_wakes_the_feeds_serving_its_task_only() -> None:
    wakeups = Wakeups()
    on_a, on_b, on_many = (
        wakeups.runs_events(["a"]),
        wakeups.runs_events(["b", "c"]),
        wakeups.runs_events([f"t{i}" for i in range(20)]),
    )
    wakeups.runs_added("a")
    assert _fired(on_a)
    assert not _fired(on_b)
    assert _fired(on_many)  # a feed serving many tasks wakes for any submit


def test_runs_of_any_task_wake_every_feed() -> None:
    wakeups = Wakeups()
    for task in (None, ANY_TASK):
        on_a, on_b = wakeups.runs_events(["a"]), wakeups.runs_events(["b"])
        wakeups.runs_added(task, local=False)
        assert _fired(on_a) and _fired(on_b)


def test_another_processs_notification_wakes_the_feeds_of_the_tasks_it_names() -> None:
    wakeups = Wakeups()
    on_a, on_b, on_c = (wakeups.runs_events([name]) for name in ("a", "b", "c"))
    wakeups.runs_added_elsewhere("a,b")
    assert _fired(on_a) and _fired(on_b) and not _fired(on_c)
    on_c, on_d = wakeups.runs_events(["c"]), wakeups.runs_events(["d"])
    wakeups.runs_added_elsewhere(None)  # unknown: every feed
    assert _fired(on_c) and _fired(on_d)


def test_a_task_name_holding_a_comma_makes_every_notification_wake_every_feed() -> None:
    wakeups = Wakeups()
    on_odd, on_e = wakeups.runs_events(["x,y"]), wakeups.runs_events(["e"])
    wakeups.runs_added_elsewhere("x,y")
    assert _fired(on_odd) and _fired(on_e)


def test_a_notification_is_queued_again_after_a_failure() -> None:
    wakeups = Wakeups()
    wakeups.runs_added("a")
    assert wakeups.take_notifications() == ["a"]
    wakeups.notify_again(["a", "b"])
    assert wakeups.take_notifications() == ["a", "b"]
