"""The mounted API: the only part of the package that imports FastAPI and
sse-starlette. Submissions come in (intake), runs go out to workers (feed),
reports come back (reports), and frontends read the result (status).
"""
