"""CLI commands, one module each (see cogvx_core/cli.py)."""
