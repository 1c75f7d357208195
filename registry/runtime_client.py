"""The reference runtime client: what a workspace runtime embeds to register, heartbeat and ack.

It imports nothing of the server but the plugin tree digest, so the sha it reports for a
plugin directory is, by construction, the content digest the registry records for every
plugin it delivers (beside the commit sha of a git source, which the files do not carry).
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeAlias, TypeVar, cast

import aiohttp

from registry.plugins.errors import FetchFailed
from registry.plugins.fetch import tree_digest

__all__ = [
    "Action",
    "ClientConfig",
    "Counters",
    "ObservedPlugin",
    "Outcome",
    "RuntimeClient",
    "plugins_in",
    "token_file",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
MaybeAwaitable: TypeAlias = T | Awaitable[T]


@dataclass(frozen=True, slots=True)
class Action:
    """Work the registry asks of the runtime (today only ``restart``)."""

    id: str
    type: str
    reason: str


@dataclass(frozen=True, slots=True)
class ObservedPlugin:
    name: str
    sha: str


class Outcome(enum.Enum):
    STOPPED = "stopped"  # stop() was called
    REMOVED = "removed"  # the registry answered 410: the workspace is gone, never beat again


@dataclass(frozen=True, slots=True)
class ClientConfig:
    registry_url: str
    workspace_id: str
    url: str | None = None  # where the registry can reach this runtime (sent on register)
    agent_card: Mapping[str, Any] | None = None
    # The directory holding one subdirectory per installed plugin (for filesystem delivery:
    # <registry plugins dir>/<workspace id>); each is reported with the registry's digest.
    plugins_dir: Path | None = None
    # Used until the registry's first answer says otherwise.
    interval_s: float = 30.0
    jitter: float = 0.1  # each interval is stretched or shrunk by up to this share
    # No delay is ever shorter than this, whatever the server says: never a hot loop.
    min_delay_s: float = 1.0
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 30.0
    # A Retry-After beyond this is clamped: a wrong header must not park a runtime for a day.
    max_retry_after_s: float = 300.0
    request_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        # A zero minimum is exactly the hot loop this client exists to prevent.
        if not self.min_delay_s > 0:
            raise ValueError("min_delay_s must be positive")
        if not self.backoff_cap_s >= self.min_delay_s:
            raise ValueError("backoff_cap_s must be at least min_delay_s")
        if not 0 <= self.jitter < 1:
            raise ValueError("jitter must be in [0, 1)")


@dataclass(slots=True)
class Counters:
    """What the client did; for callers' metrics and for tests."""

    requests: int = 0  # register and heartbeat requests that were attempted
    beats_ok: int = 0  # answers 200
    refused: int = 0  # 4xx answers (401 included)
    unavailable: int = 0  # 5xx and 429 answers
    connection_errors: int = 0  # no HTTP answer at all
    token_reloads: int = 0  # 401s after which the provider gave a different token
    restarts: int = 0  # restart hooks that succeeded
    restart_failures: int = 0
    acked: int = 0  # action ids a heartbeat carried that the registry answered 200 to


TokenProvider = Callable[[], MaybeAwaitable[str]]
RestartHook = Callable[[Action], Awaitable[None]]
PluginsProvider = Callable[[], MaybeAwaitable[list[ObservedPlugin]]]
FieldsProvider = Callable[[], MaybeAwaitable[Mapping[str, Any]]]
Sleep = Callable[[float], Awaitable[None]]


async def _resolve(value: MaybeAwaitable[T]) -> T:
    # Callbacks may be plain functions or coroutines: a runtime embeds what it has.
    if inspect.isawaitable(value):
        return cast(T, await value)
    return value


def token_file(path: Path | str) -> Callable[[], Awaitable[str]]:
    """A token provider that reads the token from a file (re-read after every 401)."""

    async def read() -> str:
        text = await asyncio.to_thread(Path(path).read_text)
        return text.strip()

    return read


def plugins_in(plugins_dir: Path) -> list[ObservedPlugin]:
    """Every plugin directory under ``plugins_dir`` with the digest the registry computes.

    Blocking (it reads every file); the client runs it in a thread.
    """
    if not plugins_dir.is_dir():
        return []
    observed = []
    for entry in sorted(plugins_dir.iterdir()):
        # Dot-directories are the registry's staging and removal areas, not plugins.
        if entry.name.startswith(".") or not entry.is_dir() or entry.is_symlink():
            continue
        try:
            observed.append(ObservedPlugin(entry.name, tree_digest(entry)))
        except (FetchFailed, OSError) as exc:
            # Not reported means "not installed" to the registry, which reinstalls it: the
            # right answer for a tree it would itself refuse.
            log.warning("plugin %s not reported: %s", entry.name, exc)
    return observed


def _retry_after(value: str | None) -> float | None:
    """The seconds form of Retry-After; the HTTP-date form falls back to our backoff."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    body: Any  # the parsed JSON of a 200, else None
    retry_after: float | None


class RuntimeClient:
    """Registers once, then heartbeats until stop() or until the workspace is removed.

    Use ``await client.run()`` in the foreground, or ``async with client:`` to run it in the
    background; ``clock``, ``sleep`` and ``rand`` are injectable so tests control time.
    """

    def __init__(
        self,
        config: ClientConfig,
        token_provider: TokenProvider,
        *,
        restart_hook: RestartHook | None = None,
        plugins: PluginsProvider | None = None,
        uptime: Callable[[], float] | None = None,
        extra_fields: FieldsProvider | None = None,
        on_removed: Callable[[], MaybeAwaitable[None]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.config = config
        self.counters = Counters()
        self._token_provider = token_provider
        self._restart_hook = restart_hook
        self._plugins = plugins
        self._uptime = uptime
        self._extra_fields = extra_fields
        self._on_removed = on_removed
        self._clock = clock
        self._sleep = sleep
        self._rand = rand
        self._started = clock()
        self._token: str | None = None
        self._failures = 0  # consecutive unsuccessful requests, the backoff exponent
        self._interval_s = config.interval_s
        self._handled: dict[str, None] = {}  # action ids whose hook succeeded (ordered set)
        self._to_ack: list[str] = []
        self._logged_ignored: set[str] = set()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[Outcome] | None = None

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> RuntimeClient:
        self._task = asyncio.ensure_future(self.run())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def stop(self) -> Outcome | None:
        """Stop beating; returns the outcome of the background run, if there is one.

        A pause is cut short at once; a request in flight finishes first (bounded by
        ``request_timeout_s``) so that an answer's actions are not half handled.
        """
        self._stopping.set()
        # Called from a hook inside the run itself (e.g. on_removed): it ends on its own.
        if self._task is None or self._task is asyncio.current_task():
            return None
        return await self._task

    async def done(self) -> Outcome:
        """Wait for the background run to end (e.g. with REMOVED)."""
        assert self._task is not None, "use `async with client:` first"
        return await asyncio.shield(self._task)

    async def run(self) -> Outcome:
        timeout = aiohttp.ClientTimeout(total=self.config.request_timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            registered = False
            while not self._stopping.is_set():
                kind = "heartbeat" if registered else "register"
                answer = await self._post(session, kind)
                if answer is not None and answer.status == 410:
                    await self._report_removed()
                    return Outcome.REMOVED
                if answer is not None and self._register_is_done(kind, answer):
                    registered = True
                await self._pause(await self._delay_after(kind, answer))
        return Outcome.STOPPED

    # ------------------------------------------------------------------ one request

    async def _post(self, session: aiohttp.ClientSession, kind: str) -> _Answer | None:
        """One request; None when no HTTP answer came back at all."""
        body = await (self._heartbeat_body() if kind == "heartbeat" else self._register_body())
        if self._token is None:
            self._token = await self._read_token()
            if self._token is None:
                return None
        url = f"{self.config.registry_url.rstrip('/')}/registry/{kind}"
        headers = {"Authorization": f"Bearer {self._token}"}
        self.counters.requests += 1
        try:
            async with session.post(url, json=body, headers=headers) as response:
                parsed = await response.json(content_type=None) if response.status == 200 else None
                return _Answer(
                    response.status, parsed, _retry_after(response.headers.get("Retry-After"))
                )
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            # ValueError: a 200 whose body is not JSON (a proxy's page); treat it like no answer.
            self.counters.connection_errors += 1
            log.warning("registry %s failed: %r", kind, exc)
            return None

    async def _read_token(self) -> str | None:
        try:
            return await _resolve(self._token_provider())
        except Exception:
            # A token file not written yet is a reason to wait, not to die.
            log.exception("reading the workspace token failed")
            return None

    async def _register_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"workspace_id": self.config.workspace_id}
        if self.config.url is not None:
            body["url"] = self.config.url
        if self.config.agent_card is not None:
            body["agent_card"] = dict(self.config.agent_card)
        return body

    async def _heartbeat_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if self._extra_fields is not None:
            try:
                body.update(await _resolve(self._extra_fields()))
            except Exception:
                # A broken extra is the runtime's bug; the beat itself must still go out.
                log.exception("extra heartbeat fields failed; beating without them")
        uptime = self._uptime() if self._uptime is not None else self._clock() - self._started
        body.update(workspace_id=self.config.workspace_id, uptime_seconds=max(0.0, uptime))
        plugins = await self._observed_plugins()
        if plugins is not None:
            body["plugins"] = [{"name": p.name, "sha": p.sha} for p in plugins]
        # Sent with every beat until a 200 proves the registry applied them.
        body["acks"] = list(self._to_ack)
        return body

    async def _observed_plugins(self) -> list[ObservedPlugin] | None:
        # None (not reported) makes the registry trust its own records; an empty list would
        # make it reinstall everything, so a failed scan reports nothing rather than [].
        try:
            if self._plugins is not None:
                return await _resolve(self._plugins())
            if self.config.plugins_dir is not None:
                return await asyncio.to_thread(plugins_in, self.config.plugins_dir)
        except Exception:
            log.exception("observing plugins failed; not reporting them this beat")
        return None

    # ------------------------------------------------------------------ what an answer means

    def _register_is_done(self, kind: str, answer: _Answer) -> bool:
        if kind != "register":
            return False
        # A 400 counts as done: register only adds where to reach us, and a registry that
        # refuses our url or card must not keep the runtime from heartbeating.
        return answer.status in (200, 400)

    async def _delay_after(self, kind: str, answer: _Answer | None) -> float:
        if answer is None:
            return self._backoff()
        if answer.status == 200:
            await self._accept(kind, answer.body)
            return self._next_beat()
        if answer.status == 401:
            self.counters.refused += 1
            return await self._after_unauthorized()
        if answer.status == 429 or answer.status >= 500:
            self.counters.unavailable += 1
            delay = self._backoff()
            if answer.retry_after is not None:
                # The server's hint is a floor; our own backoff still grows during an outage.
                delay = max(delay, min(answer.retry_after, self.config.max_retry_after_s))
            return delay
        self.counters.refused += 1
        log.warning("registry refused %s: %d", kind, answer.status)
        return self._backoff()

    async def _after_unauthorized(self) -> float:
        # The token may have been rotated under us: read it again, once per 401. A new token is
        # tried at once (still after the minimum delay); the same one means wait.
        # Counted as a failure either way, so a new token that is refused as well backs off.
        delay = self._backoff()
        fresh = await self._read_token()
        if fresh is None or fresh == self._token:
            log.warning("registry answered 401 and the token is unchanged; backing off")
            return delay
        self._token = fresh
        self.counters.token_reloads += 1
        log.info("registry answered 401; retrying with the re-read token")
        return self.config.min_delay_s

    async def _pick_up_rotated_token(self) -> None:
        # Our token is accepted only for the rotation's grace period: switch to the new one as
        # soon as the provider has it, before the old one is refused.
        fresh = await self._read_token()
        if fresh is not None and fresh != self._token:
            self._token = fresh
            self.counters.token_reloads += 1
            log.info("the workspace token was rotated; using the new one")

    async def _accept(self, kind: str, body: Any) -> None:
        self._failures = 0
        self.counters.beats_ok += 1
        if not isinstance(body, dict):
            return
        if kind == "heartbeat":
            self.counters.acked += len(self._to_ack)
            self._to_ack.clear()
        if body.get("token_rotated") is True:
            await self._pick_up_rotated_token()
        interval = body.get("next_heartbeat_s")
        if isinstance(interval, int | float) and math.isfinite(interval) and interval > 0:
            self._interval_s = float(interval)
        self._log_ignored(body.get("ignored_fields"))
        for action in _actions(body.get("actions")):
            await self._handle(action)

    def _log_ignored(self, fields: Any) -> None:
        if not isinstance(fields, list):
            return
        new = [f for f in fields if isinstance(f, str) and f not in self._logged_ignored]
        if new:
            # Once per field: the runtime is newer than the registry; worth knowing, not spam.
            self._logged_ignored.update(new)
            log.info("registry ignores these heartbeat fields: %s", ", ".join(new))

    async def _handle(self, action: Action) -> None:
        if action.id in self._handled:
            # Done already; the registry did not see our ack yet (or it was lost): ack again.
            if action.id not in self._to_ack:
                self._to_ack.append(action.id)
            return
        if action.type != "restart" or self._restart_hook is None:
            log.warning("cannot carry out action %s (%s); not acknowledged", action.id, action.type)
            return
        try:
            await self._restart_hook(action)
        except Exception:
            # Not acknowledged: the registry repeats the action, so the next beat retries it.
            self.counters.restart_failures += 1
            log.exception("restart hook failed for action %s", action.id)
            return
        self.counters.restarts += 1
        self._handled[action.id] = None
        if len(self._handled) > 1000:
            del self._handled[next(iter(self._handled))]
        self._to_ack.append(action.id)

    async def _report_removed(self) -> None:
        log.error("workspace %s was removed (410): heartbeats stop", self.config.workspace_id)
        if self._on_removed is not None:
            await _resolve(self._on_removed())

    # ------------------------------------------------------------------ timing

    def _next_beat(self) -> float:
        spread = self.config.jitter * (2 * self._rand() - 1)
        return max(self.config.min_delay_s, self._interval_s * (1 + spread))

    def _backoff(self) -> float:
        # Full jitter (a uniform draw below the capped exponential) keeps a fleet that failed
        # together from retrying together; the floor keeps a draw near 0 from hot-looping.
        self._failures += 1
        # The exponent stops growing long after the cap is reached: 2.0**1024 overflows.
        exponent = min(self._failures - 1, 32)
        ceiling = min(self.config.backoff_cap_s, self.config.backoff_base_s * 2.0**exponent)
        return max(self.config.min_delay_s, ceiling * self._rand())

    async def _pause(self, delay: float) -> None:
        """Sleep ``delay`` (through the injected sleep), cut short by stop()."""
        if self._stopping.is_set():
            return
        sleeper = asyncio.ensure_future(self._sleep(delay))
        stopper = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({sleeper, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sleeper, stopper):
                task.cancel()
            await asyncio.gather(sleeper, stopper, return_exceptions=True)


def _actions(value: Any) -> list[Action]:
    if not isinstance(value, list):
        return []
    return [
        Action(str(item["id"]), str(item.get("type", "")), str(item.get("reason", "")))
        for item in value
        if isinstance(item, dict) and "id" in item
    ]
