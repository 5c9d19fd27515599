#!/usr/bin/env bash
# README's test command: lint, typing, the public-contract check, then the
# whole test suite on SQLite and PostgreSQL. pytest options pass through
# (`bash scripts/test.sh -m "not slow"`). Creates .venv if needed and starts
# the machine's PostgreSQL if it is not running; each check is defined in
# scripts/checks.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/checks.sh lint
bash scripts/checks.sh type
bash scripts/checks.sh contract
exec bash scripts/checks.sh pytest "$@"
