"""Real processes for tests: a host app under uvicorn and worker CLIs."""
