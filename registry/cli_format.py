"""The operator CLI's human output: aligned tables and key/value blocks, from API JSON."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

JSON = dict[str, Any]
NONE = "-"
SHA_WIDTH = 12


def text(value: Any) -> str:
    if value is None or value == "":
        return NONE
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def when(value: Any, *, relative: bool = True, now: datetime | None = None) -> str:
    """An RFC 3339 time as `2024-05-01 12:00:03Z (5 s ago)`; anything else as it came."""
    if not isinstance(value, str) or not value:
        return text(value)
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return value
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    moment = moment.astimezone(UTC)
    if not relative:
        return f"{moment:%Y-%m-%d %H:%M:%S}Z"
    seconds = round(((now or datetime.now(UTC)) - moment).total_seconds())
    return f"{moment:%Y-%m-%d %H:%M:%S}Z ({_age(seconds)})"


def _age(seconds: int) -> str:
    if seconds < 0:
        return f"in {_span(-seconds)}"
    return f"{_span(seconds)} ago"


def _span(seconds: int) -> str:
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 2 * 3600:
        return f"{seconds // 60} min"
    if seconds < 2 * 86400:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} d"


def short_sha(value: Any) -> str:
    return text(value)[:SHA_WIDTH] if value else NONE


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, indent: str = "") -> str:
    """Columns padded to their widest cell; the last column is never padded."""
    cells = [list(headers), *([text(cell) for cell in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        padded = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=False)]
        lines.append((indent + "  ".join([*padded, row[-1]])).rstrip())
    return "\n".join(lines)


def block(pairs: Sequence[tuple[str, Any]], *, indent: str = "") -> str:
    """`key   value` lines, keys padded to the longest one."""
    width = max((len(key) for key, _ in pairs), default=0)
    return "\n".join(f"{indent}{key.ljust(width)}  {text(value)}".rstrip() for key, value in pairs)


LIST_OUTPUTS = ("table", "wide", "json", "name")
WIDTH = 100  # the default table fits a terminal this wide
NAME_WIDTH = 24
WHY_WIDTH = 60


def clip(value: Any, width: int) -> str:
    cell = text(value)
    return cell if len(cell) <= width else cell[: width - 1] + "…"


def age(value: Any, *, now: datetime | None = None) -> str:
    """An RFC 3339 time as its age alone (`5 s ago`), for narrow columns."""
    shown = when(value, now=now)
    return shown[shown.index("(") + 1 : -1] if shown.endswith(")") else shown


def _labels(labels: Any) -> str:
    if not isinstance(labels, dict) or not labels:
        return NONE
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items()))


def workspace_list(page: JSON, output: str) -> str:
    """`workspaces list` in one of LIST_OUTPUTS."""
    workspaces: Sequence[JSON] = page["workspaces"]
    if output == "json":
        return json.dumps(page, indent=2, ensure_ascii=False)
    if output == "name":
        return "\n".join(str(w["name"]) for w in workspaces)
    if not workspaces:
        return "no workspaces"
    if output == "wide":
        return table(
            ("ID", "NAME", "STATUS", "SYNC", "DELIVERY", "LAST HEARTBEAT", "CREATED", "LABELS"),
            (
                (
                    w["id"],
                    w["name"],
                    w["status"],
                    w.get("plugins_sync"),
                    w["delivery"],
                    when(w.get("last_heartbeat_at")),
                    when(w.get("created_at")),
                    _labels(w.get("labels")),
                )
                for w in workspaces
            ),
        )
    # 36 (id) + 24 (name) + 12 (status) + 12 (sync) + 8 (beat) + 4 gaps of 2 = 100 columns.
    return table(
        ("ID", "NAME", "STATUS", "SYNC", "BEAT"),
        (
            (
                w["id"],
                clip(w["name"], NAME_WIDTH),
                w["status"],
                w.get("plugins_sync"),
                age(w.get("last_heartbeat_at")),
            )
            for w in workspaces
        ),
    )


def created(result: JSON) -> str:
    workspace = result["workspace"]
    return "\n".join(
        [
            block(
                [
                    ("id", workspace["id"]),
                    ("name", workspace["name"]),
                    ("status", workspace["status"]),
                    ("delivery", workspace["delivery"]),
                    ("url", workspace.get("url")),
                    ("plugins", ", ".join(p["name"] for p in workspace["declared_plugins"])),
                    ("token", result["token"]),
                ]
            ),
            "",
            "The token is shown only this once (the registry keeps only its hash).",
            "Give it to the workspace runtime now; a lost token can only be rotated.",
        ]
    )


def _plugins(title: str, headers: Sequence[str], rows: list[Sequence[Any]]) -> list[str]:
    if not rows:
        return [f"{title}: none"]
    return [f"{title}:", table(headers, rows, indent="  ")]


def _ready_usable(view: JSON) -> str | None:
    if "ready" not in view:
        return None  # a registry from before lesson 16 was built
    ready = "ready" if view["ready"] else "not ready"
    return f"{ready}, {'usable' if view['usable'] else 'not usable'}"


def workspace(view: JSON) -> str:
    beat = view.get("heartbeat") or {}
    lines = [
        block(
            [
                ("id", view["id"]),
                ("name", view["name"]),
                ("labels", _labels(view.get("labels"))),
                ("status", f"{view['status']} since {when(view.get('status_changed_at'))}"),
                ("delivery", view["delivery"]),
                ("url", view.get("url")),
                ("created", when(view.get("created_at"))),
                ("last heartbeat", when(beat.get("last_heartbeat_at"))),
                ("runtime state", beat.get("runtime_state")),
                ("error rate", beat.get("error_rate")),
                ("sample error", beat.get("sample_error")),
                ("active tasks", beat.get("active_tasks")),
                ("current task", beat.get("current_task")),
                ("uptime", _seconds(beat.get("uptime_seconds"))),
                ("monthly spend", beat.get("monthly_spend")),
                ("plugins sync", view.get("plugins_sync")),
                ("ready / usable", _ready_usable(view)),
                ("last refusal", _refusal(view.get("last_refusal"))),
                ("why", view.get("why")),
            ]
        ),
        *_plugins(
            "pending actions",
            ("TYPE", "AGE", "HANDED OUT", "REASON"),
            [
                (a["type"], _seconds(a.get("age_s")), when(a.get("delivered_at")), a["reason"])
                for a in view.get("pending_actions") or []
            ],
        ),
        "",
        *_plugins(
            "declared plugins",
            ("NAME", "SOURCE"),
            [(p["name"], p["source"]) for p in view.get("declared_plugins") or []],
        ),
        *_plugins(
            "installed plugins",
            ("NAME", "SHA", "INSTALLED", "SOURCE"),
            [
                (p["name"], short_sha(p.get("sha")), when(p.get("installed_at")), p["source"])
                for p in view.get("installed_plugins") or []
            ],
        ),
    ]
    observed = view.get("observed_plugins")
    if observed is None:
        lines.append("observed plugins: not reported by the runtime")
    else:
        lines.extend(
            _plugins(
                "observed plugins",
                ("NAME", "SHA"),
                [(p.get("name"), short_sha(p.get("sha"))) for p in observed],
            )
        )
    last = view.get("last_reconcile")
    lines.append("")
    if last is None:
        lines.append("last reconcile: none")
    else:
        lines.append("last reconcile:")
        lines.append(reconcile(last, indent="  "))
    return "\n".join(lines)


def _refusal(refusal: dict[str, Any] | None) -> str | None:
    if refusal is None:
        return None
    field = "" if refusal.get("field") is None else f" ({refusal['field']})"
    return (
        f"{refusal['status']} {refusal['code']}{field} at {when(refusal.get('at'))}, "
        f"{refusal['count']} times"
    )


def _seconds(value: Any) -> str:
    return NONE if value is None else f"{value:g} s" if isinstance(value, float) else f"{value} s"


def reconcile(run: JSON, *, indent: str = "") -> str:
    pairs: list[tuple[str, Any]] = [
        ("reconcile", run["id"]),
        ("workspace", run["workspace_id"]),
        ("status", run["status"]),
        ("trigger", run.get("trigger")),
        ("refresh", run.get("refresh")),
        ("attempt", run.get("attempt")),
        ("created", when(run.get("created_at"))),
        ("started", when(run.get("started_at"))),
        ("finished", when(run.get("finished_at"))),
        ("error", run.get("error")),
    ]
    if run.get("next_attempt_at"):
        pairs.append(("next attempt", when(run["next_attempt_at"])))
    restart = run.get("restart_requested")
    if run.get("restart_withheld"):
        restart = "withheld (restart budget used up)"
    pairs.append(("restart", restart))
    steps = run.get("steps") or []
    lines = [block(pairs, indent=indent)]
    if not steps:
        lines.append(f"{indent}steps: none")
    else:
        lines.append(f"{indent}steps:")
        lines.append(
            table(
                ("PLUGIN", "ACTION", "STATUS", "SHA", "ERROR"),
                (
                    (s["plugin"], s["action"], s["status"], short_sha(s.get("sha")), s.get("error"))
                    for s in steps
                ),
                indent=indent + "  ",
            )
        )
    return "\n".join(lines)


def progress(run: JSON) -> str:
    """One line on where a run is, for the wait in `registry reconcile`."""
    status, attempt = run["status"], run.get("attempt") or 0
    line = f"reconcile {run['id']}: {status}"
    if status == "queued" and run.get("error"):
        # A failed attempt waits for its retry; the API keeps the last error on the run.
        line += f" for a retry (attempt {attempt} failed: {run['error']})"
        if run.get("next_attempt_at"):
            line += f", next attempt {when(run['next_attempt_at'])}"
    elif attempt:
        line += f", attempt {attempt}"
    return line


def _change(event: JSON) -> str:
    if event.get("kind") == "status":
        before = event.get("from")
        return f"{before} -> {event.get('to')}" if before else f"-> {event.get('to')}"
    detail = event.get("detail")
    if not isinstance(detail, dict):
        return text(detail)
    if event.get("kind") == "audit":
        # An operator action: what it was given, as key=value (see registry/audit.py).
        return " ".join(f"{k}={_compact(v)}" for k, v in detail.items()) or NONE
    parts = []
    if detail.get("changes"):
        parts.append(", ".join(map(str, detail["changes"])))
    if detail.get("error"):
        parts.append(f"error: {detail['error']}")
    if detail.get("delay_s") is not None:
        parts.append(f"retry in {detail['delay_s']} s")
    if detail.get("restart_requested"):
        parts.append("restart requested")
    return "; ".join(parts) or "no changes"


def _compact(value: Any) -> str:
    if isinstance(value, list):
        return (
            ",".join(str(v.get("name", v)) if isinstance(v, dict) else str(v) for v in value)
            or "[]"
        )
    return text(value)


def _workspace(event: JSON, name: str | None = None) -> str:
    """An event's workspace: its name when known, else its id; `-` for fleet events."""
    return text(name or event.get("workspace_name") or event.get("workspace_id"))


def events_table(events: Sequence[JSON]) -> str:
    if not events:
        return "no events"
    return table(
        ("ID", "AT", "WORKSPACE", "KIND", "CAUSE", "ACTOR", "CHANGE"),
        (
            (
                e["id"],
                when(e.get("at"), relative=False),
                clip(_workspace(e), NAME_WIDTH),
                e["kind"],
                e.get("cause"),
                e.get("actor"),
                _change(e),
            )
            for e in events
        ),
    )


def event_line(event: JSON, name: str | None = None) -> str:
    """One streamed event: `#12 2024-… ws-a status provisioning -> online (heartbeat)`."""
    return (
        f"#{text(event.get('id'))} {when(event.get('at'), relative=False)} "
        f"{_workspace(event, name)} "
        f"{text(event.get('kind'))} {_change(event)} "
        f"({text(event.get('cause'))}, by {text(event.get('actor'))})"
    )


def reconciles_table(runs: Sequence[JSON]) -> str:
    if not runs:
        return "no reconciles"
    return table(
        ("ID", "TRIGGER", "STATUS", "ATTEMPT", "CREATED", "FINISHED", "ERROR"),
        (
            (
                r["id"],
                r.get("trigger"),
                r["status"],
                r.get("attempt"),
                age(r.get("created_at")),
                age(r.get("finished_at")),
                clip(r.get("error"), WHY_WIDTH),
            )
            for r in runs
        ),
    )


def fleet(view: JSON) -> str:
    guard = view.get("mass_expiry_guard") or {}
    counts = view.get("statuses") or {}
    lines = [
        table(("STATUS", "WORKSPACES"), sorted(counts.items())) if counts else "no workspaces",
        "",
        "mass-expiry guard:",
        block(
            [
                ("holding", guard.get("holding")),
                ("since", when(guard.get("since"))),
                ("live", guard.get("live")),
                ("silent", guard.get("silent")),
                ("expired", guard.get("expired")),
                ("updated", when(guard.get("updated_at"))),
            ],
            indent="  ",
        ),
    ]
    syncs = view.get("plugins_sync")
    if isinstance(syncs, dict) and syncs:
        lines[1:1] = ["", table(("PLUGINS SYNC", "WORKSPACES"), sorted(syncs.items()))]
    return "\n".join(lines)


HISTORY_STATUSES = ("provisioning", "online", "degraded", "offline", "failed", "paused")


def fleet_history(view: JSON) -> str:
    """One row a minute, oldest first: the counts the dashboard's chart draws."""
    points = view.get("points") or []
    rows = [
        (
            when(point.get("at"), relative=False),
            *(point["statuses"].get(s) for s in HISTORY_STATUSES),
        )
        for point in points
        if isinstance(point, dict) and isinstance(point.get("statuses"), dict)
    ]
    return table(("AT", *(s.upper() for s in HISTORY_STATUSES)), rows) if rows else "no history"
