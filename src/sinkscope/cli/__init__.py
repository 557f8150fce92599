"""The `sinkscope` command. Importing this package imports neither torch nor transformers: every command module
loads the analysis it runs inside the command function."""

from sinkscope.cli.app import app, main

__all__ = ["app", "main"]
