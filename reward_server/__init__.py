"""The reward server: a FastAPI verification service (POST /v1/verify)."""
