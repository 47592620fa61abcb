"""Exception types that name what is wrong and where, so a user can fix input before expensive work."""


class OrchestratorError(Exception):
    """Base class: every error the CLIs turn into a one-line message instead of a traceback."""


class RecipeError(OrchestratorError):
    """A recipe file or override is invalid (message names the file and the dotted key)."""


class DataError(OrchestratorError):
    """A dataset, manifest, shard or image is missing or malformed (message names the URL/shard/row)."""


class StorageError(DataError):
    """Storage stayed unreachable after all retries (message names the URL)."""


class CheckpointError(OrchestratorError):
    """A checkpoint cannot be read or does not fit the model."""


class TrainingError(OrchestratorError):
    """Training cannot continue (e.g. too many non-finite losses)."""


class SweepInterrupted(OrchestratorError):
    """A sweep stopped before all trials finished; re-running the same command continues it."""
