"""Domain errors and the one middleware that renders every error as API.md's JSON envelope."""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from registry.db.errors import DatabaseUnavailable
from registry.jsonio import json_response
from registry.throttled_log import ThrottledLog

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Seconds a client should wait before retrying while the database is unreachable.
DB_RETRY_AFTER_S = 2
# Seconds a client should wait before retrying while the registry starts (registry/startup.py):
# about what migrations and opening the pools take, and long enough that a fleet of runtimes
# retrying at once does not turn the start-up into a hot loop.
STARTING_RETRY_AFTER_S = 2
# Seconds a client turned away by the in-flight cap should wait: requests finish in ms.
OVERLOADED_RETRY_AFTER_S = 1
# Out of file descriptors: one warning per this many seconds, with a count, however many
# requests fail meanwhile.
FD_EXHAUSTED = ThrottledLog(log, logging.WARNING, 10.0)
_FD_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE})


class ApiError(Exception):
    """An error with a stable code, an HTTP status and, when one input is at fault, its field."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, field: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        if code is not None:
            self.code = code

    def body(self) -> dict[str, object]:
        error: dict[str, object] = {"code": self.code, "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        return {"error": error}


class InvalidField(ApiError):
    code = "invalid_field"


class InvalidBody(ApiError):
    code = "invalid_body"


class Unauthorized(ApiError):
    status = 401
    code = "unauthorized"


class Forbidden(ApiError):
    status = 403
    code = "forbidden"


class NotFound(ApiError):
    status = 404
    code = "not_found"


class Conflict(ApiError):
    status = 409
    code = "conflict"


def workspace_not_found(workspace_id: object) -> NotFound:
    return NotFound(f"no workspace {workspace_id}", code="workspace_not_found")


def workspace_removed() -> Conflict:
    """Management actions on a tombstone: one answer everywhere (runtimes get 410 instead)."""
    return Conflict("the workspace was removed", code="workspace_removed")


class Gone(ApiError):
    status = 410
    code = "workspace_removed"


class HistoryPruned(ApiError):
    """A resume point older than what retention deleted: events may be missing after it."""

    status = 410
    code = "history_pruned"


class ServiceUnavailable(ApiError):
    status = 503
    code = "database_unavailable"
    retry_after_s = DB_RETRY_AFTER_S


class Overloaded(ServiceUnavailable):
    """More requests in flight than REGISTRY_MAX_REQUESTS_IN_FLIGHT (registry/admission.py)."""

    code = "overloaded"
    retry_after_s = OVERLOADED_RETRY_AFTER_S


class OutOfDescriptors(ServiceUnavailable):
    """The process ran out of file descriptors (EMFILE): the database is fine, this process
    cannot open a socket or file until some close."""

    code = "out_of_file_descriptors"
    retry_after_s = OVERLOADED_RETRY_AFTER_S


class RequestTimeout(ApiError):
    """The request body did not arrive within REGISTRY_BODY_TIMEOUT_S (registry/body.py)."""

    status = 408
    code = "request_timeout"


class Starting(ServiceUnavailable):
    """The process is up but not ready yet: migrations, the database or the workers pending."""

    code = "starting"
    retry_after_s = STARTING_RETRY_AFTER_S


# Status of a request whose client hung up before the answer (nginx's "client closed
# request"): nobody reads it, but the access log and metrics should not count a 5xx for it.
CLIENT_GONE_STATUS = 499


def client_gone(request: web.BaseRequest, exc: BaseException) -> bool:
    """The client hung up: a connection error while its transport is gone (aiohttp raises
    ConnectionResetError from a body read, ClientConnectionResetError from a write)."""
    transport = request.transport
    return isinstance(exc, ConnectionError) and (transport is None or transport.is_closing())


_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
}


# Headers of an HTTPException that describe its text/plain body, which the envelope replaces.
_OWN_HEADERS = frozenset({"content-type", "content-length"})


def _error_response(status: int, code: str, message: str, **extra: object) -> web.Response:
    error: dict[str, object] = {"code": code, "message": message, **extra}
    return json_response({"error": error}, status=status)


def _api_error_response(exc: ApiError) -> web.Response:
    response = json_response(exc.body(), status=exc.status)
    if isinstance(exc, ServiceUnavailable):
        response.headers["Retry-After"] = str(exc.retry_after_s)
    return response


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return _api_error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "http_error")
        response = _error_response(exc.status, code, exc.reason)
        # Keep what the exception says about the resource, e.g. the Allow header that RFC 9110
        # requires on a 405; the body and its type are ours.
        for name, value in exc.headers.items():
            if name.lower() not in _OWN_HEADERS:
                response.headers.add(name, value)
        return response
    except DatabaseUnavailable as exc:
        log.warning("database unavailable during %s %s: %s", request.method, request.path, exc)
        response = _error_response(503, "database_unavailable", "the database is unreachable")
        response.headers["Retry-After"] = str(DB_RETRY_AFTER_S)
        return response
    except Exception as exc:
        if isinstance(exc, OSError) and exc.errno in _FD_ERRNOS:
            # Not the database (registry/db/errors.py): this process hit its own fd limit.
            FD_EXHAUSTED.report(
                "out of file descriptors during %s %s: %s", request.method, request.path, exc
            )
            return _api_error_response(
                OutOfDescriptors("the registry is out of file descriptors; retry later")
            )
        if client_gone(request, exc):
            # Not an error of the registry: no warning, no 5xx, nothing to retry.
            log.debug("client gone during %s %s: %r", request.method, request.path, exc)
            return _error_response(CLIENT_GONE_STATUS, "client_gone", "the client hung up")
        log.exception("unhandled error in %s %s", request.method, request.path)
        return _error_response(500, "internal_error", "internal error")


class AlreadyExists(Conflict):
    """A create whose name a live workspace has: the body names it, so a provisioning script
    that retries a create it is not sure went through can carry on with that workspace."""

    code = "already_exists"

    def __init__(self, message: str, *, workspace_id: object, field: str = "name") -> None:
        super().__init__(message, field=field)
        self.workspace_id = workspace_id

    def body(self) -> dict[str, object]:
        body = super().body()
        error = body["error"]
        assert isinstance(error, dict)
        error["workspace_id"] = self.workspace_id
        return body
