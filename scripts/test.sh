#!/usr/bin/env bash
# The whole test suite on SQLite and PostgreSQL, then lint, typing and the
# public-contract check. Starts the machine's PostgreSQL if it is not running.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

bash scripts/ensure-postgres.sh

.venv/bin/ruff format --check fastapi_bgtasks tests example_app benchmarks
.venv/bin/ruff check fastapi_bgtasks tests example_app benchmarks
.venv/bin/mypy
if [ -f ../shared/contract_check.py ]; then
    .venv/bin/python ../shared/contract_check.py
fi
exec .venv/bin/python -m pytest "$@"
