"""The live stream's wire format: an event as JSON, and the Server-Sent-Events frames."""

from __future__ import annotations

from typing import Any

from registry.db.events import Event
from registry.jsonio import dumps


def event_view(event: Event) -> dict[str, Any]:
    return {
        "id": event.id,
        "workspace_id": event.workspace_id,
        "kind": event.kind,
        "from": event.from_status,
        "to": event.to_status,
        "cause": event.cause,
        "actor": event.actor,
        "detail": event.detail,
        "at": event.at,
    }


def frame(event: Event) -> bytes:
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (
        event.id,
        event.kind.encode(),
        dumps(event_view(event)),
    )


def reset_frame(pruned_through: int) -> bytes:
    """Tells a resuming client that events after its Last-Event-ID may have been pruned; the
    stream goes on after `pruned_through`, which is also this frame's id."""
    data = {"reason": "history_pruned", "pruned_through": pruned_through}
    return b"id: %d\nevent: reset\ndata: %s\n\n" % (pruned_through, dumps(data))


def dropped_frame(last_event_id: int) -> bytes:
    """The last frame to a subscriber that fell too far behind: the stream ends here. Its id
    is the last event it was sent, so a client that reconnects (an EventSource does so by
    itself) resumes exactly after it, from the database, and misses nothing."""
    data = {"reason": "slow_subscriber", "last_event_id": last_event_id}
    return b"id: %d\nevent: dropped\ndata: %s\n\n" % (last_event_id, dumps(data))


def unauthorized_frame(code: str, message: str) -> bytes:
    """The last frame of a stream whose caller is no longer allowed (its token revoked or
    expired, its session ended): the stream ends here, and a reconnect is answered 401."""
    return b"event: unauthorized\ndata: %s\n\n" % dumps({"code": code, "message": message})


RETRY = b"retry: 1000\n\n"  # the client reconnects after this long if the stream drops
KEEPALIVE = b": keepalive\n\n"
