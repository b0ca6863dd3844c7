"""rtlib's error taxonomy: every failure a user can cause is an `RtlibError` carrying the exit code
the command line returns for it, so `rtlib.cli.main` catches one type and prints one line.

Library users can catch `RtlibError` for all of them, or a subclass for one kind. Each class
also derives from the builtin it refines (ValueError for bad input, RuntimeError for failures
while running), so code written against those keeps working.
"""

from collections.abc import Sequence

EXIT_ERROR = 1  # data, run directory or checkpoint problems
EXIT_USAGE = 2  # an invalid spec or argument
EXIT_NON_FINITE = 3  # training diverged


class RtlibError(Exception):
    """Base of every error rtlib raises on purpose; `exit_code` is what the CLI returns."""

    exit_code: int = EXIT_ERROR


class BadArgument(RtlibError, ValueError):
    """An argument out of range; the message names it and the range."""

    exit_code = EXIT_USAGE


class SpecError(RtlibError, ValueError):
    """A spec that cannot be used; `problems` holds one line per problem, `str()` all of them."""

    exit_code = EXIT_USAGE

    def __init__(self, source: str, problems: Sequence[str]):
        self.source = source
        self.problems = list(problems)
        super().__init__("\n".join(f"{source}: {p}" for p in self.problems))


class MeshError(RtlibError, ValueError):
    """A mesh that the devices or the spec's array sizes cannot satisfy; the message names the
    spec keys to change."""

    exit_code = EXIT_USAGE


class UnsupportedModel(RtlibError, ValueError):
    """A model that the asked-for command cannot use (e.g. training an encoder with the
    next-token loss); the message says what would work. A spec problem: exit 2."""

    exit_code = EXIT_USAGE


class SourceError(RtlibError, ValueError):
    """A corpus that cannot be read; the message names the path and the reason."""


class StoreError(RtlibError, ValueError):
    """A token store that is missing, incomplete or unusable; the message says which and why."""


class RunError(RtlibError, RuntimeError):
    """A run directory that cannot be used as asked; the message says why and what to do."""


class CheckpointError(RtlibError, RuntimeError):
    """A checkpoint that cannot be read or written; the message names it."""


class DistributedError(RtlibError, RuntimeError):
    """The multi-process job could not start; the message says which setting to fix."""


class NonFiniteLoss(RtlibError, RuntimeError):
    """Training produced a NaN or infinite loss; the last good checkpoint is kept."""

    exit_code = EXIT_NON_FINITE
