"""Entrypoints: `aepo` (main.py), `aepo train` / `python -m services.cli.train`, the bandit demo."""
