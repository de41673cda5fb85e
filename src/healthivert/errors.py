"""One error family for every problem a user can fix: ``<file>: <problem> (<hint>)`` on one line."""

from __future__ import annotations

from os import PathLike


class HealthiVertError(Exception):
    """A problem with an input, a parameter or a checkpoint, reported as one line.

    Args:
        source: the file (or parameter) the problem is about.
        problem: what is wrong, in a few words.
        hint: optionally, what to do about it.
    """

    def __init__(self, source: str | PathLike[str], problem: str, hint: str | None = None) -> None:
        self.source = str(source)
        self.problem = problem
        self.hint = hint
        super().__init__(str(self))

    def __reduce__(self) -> tuple[type, tuple[str, str, str | None]]:
        """Rebuild from the three fields (so errors survive multiprocessing)."""
        return (type(self), (self.source, self.problem, self.hint))

    def __str__(self) -> str:
        text = f"{self.source}: {self.problem}"
        if self.hint:
            text += f" ({self.hint})"
        return " ".join(text.split())


class InputDataError(HealthiVertError):
    """An input file is missing, unreadable, or inconsistent with the others."""


class ConfigError(HealthiVertError):
    """A parameter file or a command-line setting is invalid."""


class CheckpointError(HealthiVertError):
    """A checkpoint or saved model does not match what is asked of it."""


class OutputError(HealthiVertError):
    """An output location cannot be written: a file where a folder is expected, no permission, a full disk."""
