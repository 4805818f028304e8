"""Errors meant for people: one line, naming the cause; the CLI turns them into exit code 2."""


class OrchestratorError(Exception):
    """A mistake in what the user asked for (spec, data, model, storage, credentials).

    The CLI prints `str(error)` as one line and exits with code 2, without a traceback.
    """

    exit_code = 2


class JobSpecError(OrchestratorError):
    """The job spec is malformed or invalid."""


class StorageError(OrchestratorError):
    """Object storage is unreachable, refuses our credentials, or holds something unexpected."""


class PreflightError(OrchestratorError):
    """The spec is valid, but the model or data it names cannot be used."""
