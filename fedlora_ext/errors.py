"""Errors a run ends with, shown by the CLI as one ``fedlora: error: ...`` line (exit 2)."""


class RunError(RuntimeError):
    """A run that cannot go on: a deterministic failure of every sampled client, a folder that holds
    another run or is locked by one. The message is the whole story, in one line."""
