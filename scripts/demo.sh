#!/usr/bin/env bash
# Quick start: the example app with two workers on the embedded SQLite default.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m example_app.demo
