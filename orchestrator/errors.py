"""Errors meant for people: one line, naming the cause; the CLI turns them into exit code 2."""

import os
import re

# Values that must never reach a terminal, a log or a stored file, wherever an error message quotes them.
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN", "RAY_AUTH_TOKEN")
_URL_USERINFO = re.compile(r"(\b[a-z][a-z0-9+.-]*://)[^/\s@'\"]+@", re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with credentials in URLs (scheme://user:secret@host) and known secret values blanked."""
    text = _URL_USERINFO.sub(r"\1<redacted>@", text)
    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 6:
            text = text.replace(value, "<redacted>")
    return text


def first_line(error: BaseException, with_type: bool = False) -> str:
    """An error's message in one line for people, redacted (servers echo requests, and a URL may carry
    credentials): its first line, else its type's name; `with_type`: prefixed with the type's name."""
    lines = str(error).strip().splitlines()
    if with_type:
        return redact(f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__)
    return redact(lines[0] if lines else type(error).__name__)


class OrchestratorError(Exception):
    """A mistake in what the user asked for (spec, data, model, storage, credentials).

    The CLI prints `str(error)` as one line and exits with code 2, without a traceback. The text
    is redacted: an error about a URL with credentials in it must not repeat them.
    """

    exit_code = 2
    label = "error"  # what the CLI prints before the message

    def __str__(self) -> str:
        return redact(super().__str__())


class JobSpecError(OrchestratorError):
    """The job spec is malformed or invalid."""


class StorageError(OrchestratorError):
    """Object storage is unreachable, refuses our credentials, or holds something unexpected."""


class PreflightError(OrchestratorError):
    """The spec is valid, but the model or data it names cannot be used."""
