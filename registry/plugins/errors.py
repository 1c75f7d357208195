"""The plugin error hierarchy and its stable machine codes."""

from __future__ import annotations

from typing import ClassVar


class PluginError(Exception):
    """Base of every plugin failure.

    ``code`` is a stable machine-readable string the API and the reconcile runner
    switch on; ``transient`` is True only when a retry may succeed without anyone
    changing the declaration or the source (network trouble, timeouts, disk hiccups).
    """

    default_code: ClassVar[str] = "plugin_error"

    def __init__(self, message: str, *, code: str | None = None, transient: bool = False) -> None:
        super().__init__(message)
        self.code: str = code or self.default_code
        self.message: str = message
        self.transient: bool = transient

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code!r}, message={self.message!r}, "
            f"transient={self.transient!r})"
        )


class InvalidSource(PluginError):
    """The declaration itself is wrong (syntax, scheme, ref, subdir, name); never transient."""

    default_code = "invalid_source"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message, code=code, transient=False)


class SourceDenied(PluginError):
    """The source is well-formed but outside the configured allowlist; never transient."""

    default_code = "source_denied"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message, code=code, transient=False)


class FetchFailed(PluginError):
    """Anything that goes wrong while resolving, staging or delivering a plugin."""

    default_code = "fetch_failed"
