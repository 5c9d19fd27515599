"""The seed's guided examples, ported to fastapi_bgtasks."""
