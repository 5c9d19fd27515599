"""A FastAPI app with one route and no plugin: the memory baseline the
benchmark app (benchapp) is compared against."""

from __future__ import annotations

from fastapi import FastAPI

app = FastAPI()


@app.get("/")
async def root() -> dict[str, str]:
    return {"status": "ok"}
