#!/usr/bin/env bash
# Every check the project runs, defined here once: scripts/test.sh (README's
# test command), tox.ini and .ci/run all call this script.
#
#   bash scripts/checks.sh lint               ruff format --check, then ruff check
#   bash scripts/checks.sh type               mypy --strict on the package
#   bash scripts/checks.sh contract           the public-contract check, when
#                                             ../shared/contract_check.py is there
#   bash scripts/checks.sh pytest [ARGS...]   the test suite (starts PostgreSQL first)
#
# The tools run from the environment of $CHECKS_PYTHON (default .venv/bin/python,
# the one scripts/setup.sh makes); tox and CI point it at their own.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${CHECKS_PYTHON:-.venv/bin/python}"
sources=(fastapi_bgtasks tests example_app benchmarks)

case "${1:-}" in
    lint)
        "$python" -m ruff format --check "${sources[@]}"
        "$python" -m ruff check "${sources[@]}"
        ;;
    type)
        "$python" -m mypy
        ;;
    contract)
        if [ -f ../shared/contract_check.py ]; then
            "$python" ../shared/contract_check.py
        else
            echo "contract check skipped: ../shared/contract_check.py is not there"
        fi
        ;;
    pytest)
        shift
        bash scripts/ensure-postgres.sh
        exec "$python" -m pytest "$@"
        ;;
    *)
        echo "usage: bash scripts/checks.sh lint|type|contract|pytest [pytest args...]" >&2
        exit 2
        ;;
esac
