"""Exception types that name what is wrong and where, so a user can fix input before expensive work.

``exit_code`` is what the command line returns for each: 2 for bad input (a recipe, a path, a
credential the user can fix), 1 when a run failed on its way, 130 when it was interrupted.
"""


class OrchestratorError(Exception):
    """Base class: every error the CLIs turn into a one-line message instead of a traceback."""

    exit_code = 1


class RecipeError(OrchestratorError):
    """A recipe file or override is invalid (message names the file and the dotted key)."""

    exit_code = 2


class DataError(OrchestratorError):
    """A dataset, manifest, shard or image is missing or malformed (message names the URL/shard/row)."""

    exit_code = 2


class StorageError(DataError):
    """Storage is unreachable, refuses the credentials, or stayed failing after all retries (names the URL)."""


class CheckpointError(OrchestratorError):
    """A checkpoint or weights file cannot be read or does not fit the model."""

    exit_code = 2


class TrainingError(OrchestratorError):
    """Training cannot continue (e.g. too many non-finite losses)."""


class Interrupted(OrchestratorError):
    """Stopped on request (Ctrl-C, SIGTERM, a sweep cut short); re-running the same command continues."""

    def __init__(self, message: str, exit_code: int = 130) -> None:
        super().__init__(message)
        self.exit_code = exit_code  # 128 + the signal, as a shell reports it

    def __reduce__(self) -> tuple[type, tuple[str, int]]:  # crosses processes (Ray) with its exit code
        return type(self), (str(self), self.exit_code)
