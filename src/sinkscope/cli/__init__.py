"""The `sinkscope` command. Importing this package imports neither torch nor transformers: every command module
loads the library it runs inside the command function (`sinkscope.cli.options` holds what the commands share)."""

from sinkscope.cli.app import app, main

__all__ = ["app", "main"]
