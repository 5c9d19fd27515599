"""Prefect's background-task examples (its guided examples of deferred tasks and
task workers), ported to fastapi_bgtasks."""
