"""Every timing knob the tests use, scaled down together (RELIABILITY.md §3.4)."""

LEASE_SECONDS = 2.0
HEARTBEAT_SECONDS = 0.4
REAPER_SECONDS = 0.2
POLL_SECONDS = 0.2
# How long a test waits for something that normally takes milliseconds.
DEADLINE = 20.0
