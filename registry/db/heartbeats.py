"""The heartbeat statement: for a batch of beats, read each previous status and apply each
beat, in one statement, one transaction, one round trip."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from registry.db import Connection
from registry.statuses import (
    HEARTBEAT_TABLES,
    LIVE_STATUSES,
    RECONCILE_ENTRY_FROM,
    Health,
    Status,
)


@dataclass(frozen=True, slots=True)
class Beat:
    """One heartbeat (or registration), validated."""

    workspace_id: uuid.UUID
    token_hash: bytes
    health: Health
    # None: not reported by this beat; the stored value stays.
    error_rate: float | None
    sample_error: str | None
    active_tasks: int | None
    uptime_seconds: float | None
    current_task: str | None
    monthly_spend: float | None
    runtime_state: str | None
    observed_plugins: list[dict[str, str]] | None
    acks: list[uuid.UUID]
    # Set by register only: where the workspace can be reached, and its agent card.
    url: str | None = None
    agent_card: Any = None
    # The box's own identity (a container or instance id), if its runtime sends one.
    instance_id: str | None = None
    cause: str = "heartbeat"


@dataclass(frozen=True, slots=True)
class BeatResult:
    """What the statement saw and did. `status` is None when nothing was written."""

    previous_status: Status | None  # None: no workspace with this id and token
    status: Status | None
    reconcile_id: uuid.UUID | None  # a reconcile intent this beat committed or folded into
    actions: list[dict[str, Any]]
    old_token: bool = False  # authenticated by the previous token, in its grace period

    @property
    def reconcile_queued(self) -> bool:
        return self.reconcile_id is not None


NOT_FOUND = BeatResult(None, None, None, [])

# The transition tables of every health, flattened once into the arrays the statement joins.
_TABLE_HEALTH = [h.value for h, t in HEARTBEAT_TABLES.items() for _ in t.from_statuses]
_TABLE_FROM = [s for t in HEARTBEAT_TABLES.values() for s in t.from_statuses]
_TABLE_TO = [s for t in HEARTBEAT_TABLES.values() for s in t.to_statuses]

# Rows are locked in id order, so concurrent batches cannot deadlock; the row lock makes the
# previous status each beat reports exact: of any number of concurrent beats for one
# workspace, one sees `provisioning` (DESIGN lesson 1). Events and reconcile intents come
# only from rows the UPDATE changed (lesson 3). The transition table is a parameter, so
# statuses.py stays the one owner of the rules. A batch never holds one workspace twice
# (the batcher keeps duplicates for the next batch): UPDATE … FROM would apply only one.
HEARTBEATS = """
WITH input AS (
    SELECT * FROM unnest(
        $1::uuid[], $2::bytea[], $3::text[], $4::float8[], $5::text[], $6::int[],
        $7::float8[], $8::text[], $9::float8[], $10::text[], $11::text[], $12::text[],
        $13::text[], $14::text[], $24::text[]
    ) AS i(id, token_hash, health, error_rate, sample_error, active_tasks,
           uptime_seconds, current_task, monthly_spend, runtime_state, observed_plugins,
           url, agent_card, cause, instance_id)
),
target AS (
    SELECT w.status AS previous_status, w.uptime_seconds AS previous_uptime,
           w.last_heartbeat_at AS previous_beat_at,
           -- Registered by another box than the last one that said who it was.
           COALESCE(i.instance_id <> w.instance_id, false) AS box_changed,
           w.token_hash <> i.token_hash AS old_token,
           -- The reported plugin list, parsed once (NULL: not reported), and its digest
           -- beside the stored one's (the row as locked, before this update).
           i.observed_plugins::jsonb AS reported_plugins,
           w.reported_plugins_digest AS stored_plugins_digest,
           i.*
    FROM input i
    -- The previous token keeps working through its rotation grace period.
    JOIN workspaces w ON w.id = i.id
        AND (w.token_hash = i.token_hash
             OR (w.previous_token_hash = i.token_hash AND w.previous_token_valid_until > now()))
    ORDER BY w.id
    FOR UPDATE OF w
),
transition AS (
    SELECT t.*, COALESCE(m.to_status, t.previous_status) AS status,
           -- Uptime went down: the box restarted (on its own, or as it was asked) since then.
           CASE WHEN t.uptime_seconds < t.previous_uptime
                THEN now() - make_interval(secs => t.uptime_seconds) END AS restarted_at,
           extract(epoch FROM now() - t.previous_beat_at)::float8 AS gap_s,
           sha256(convert_to(t.reported_plugins::text, 'UTF8')) AS reported_plugins_digest
    FROM target t
    LEFT JOIN unnest($15::text[], $16::text[], $17::text[]) AS m(health, from_status, to_status)
        ON m.health = t.health AND m.from_status = t.previous_status
    WHERE t.previous_status <> 'removed'
),
beat AS (
    UPDATE workspaces w SET
        status = tr.status,
        status_changed_at = CASE WHEN tr.status <> tr.previous_status
                                 THEN now() ELSE w.status_changed_at END,
        last_heartbeat_at = now(),
        -- NULL means "not reported" (register, or no plugins list): keep what we had.
        error_rate = COALESCE(tr.error_rate, w.error_rate),
        sample_error = COALESCE(tr.sample_error, w.sample_error),
        active_tasks = COALESCE(tr.active_tasks, w.active_tasks),
        uptime_seconds = COALESCE(tr.uptime_seconds, w.uptime_seconds),
        current_task = COALESCE(tr.current_task, w.current_task),
        monthly_spend = COALESCE(tr.monthly_spend, w.monthly_spend),
        runtime_state = COALESCE(tr.runtime_state, w.runtime_state),
        -- The list itself is in `reported_plugins`, written only when it changed (below):
        -- the row keeps 32 bytes of it, not the list, so an unchanged report adds no WAL
        -- (migration 0019, bench/wal.py).
        reported_plugins_digest = COALESCE(tr.reported_plugins_digest,
                                           w.reported_plugins_digest),
        -- Retired by migration 0019 but still written by the previous release's processes
        -- during a rolling upgrade: their copy leaves the row here (NULL again costs nothing;
        -- the list itself is in `reported_plugins`, from this release's beats).
        observed_plugins = NULL,
        observed_plugins_at = NULL,
        instance_id = COALESCE(tr.instance_id, w.instance_id),
        url = COALESCE(tr.url, w.url),
        agent_card = COALESCE(tr.agent_card::jsonb, w.agent_card),
        previous_token_used_at = CASE WHEN tr.old_token THEN now()
                                      ELSE w.previous_token_used_at END,
        -- The runtime's own interval: a moving average of the gaps between beats while it
        -- was live, so one quick beat (register, then heartbeat) or one late one moves it
        -- only a little. A gap longer than $22 s is an outage, not an interval.
        heartbeat_interval_s = CASE
            WHEN tr.previous_status = ANY($19::text[]) AND tr.gap_s <= $22
            THEN COALESCE(0.7 * w.heartbeat_interval_s + 0.3 * tr.gap_s, tr.gap_s)
            ELSE w.heartbeat_interval_s END
    FROM transition tr
    WHERE w.id = tr.id
    RETURNING w.id, tr.previous_status, w.status, tr.cause, tr.old_token, tr.restarted_at,
              tr.uptime_seconds, tr.previous_uptime, tr.box_changed,
              CASE WHEN tr.reported_plugins_digest IS DISTINCT FROM tr.stored_plugins_digest
                   THEN tr.reported_plugins END AS changed_plugins
),
-- A report that differs from the stored one (NULL: not reported, or the same). The row lock
-- taken above serialises this per workspace.
reported AS (
    INSERT INTO reported_plugins (workspace_id, plugins, changed_at)
    SELECT b.id, b.changed_plugins, now() FROM beat b WHERE b.changed_plugins IS NOT NULL
    ON CONFLICT (workspace_id) DO UPDATE
        SET plugins = EXCLUDED.plugins, changed_at = EXCLUDED.changed_at
),
event AS (
    INSERT INTO workspace_events
        (workspace_id, kind, from_status, to_status, cause, actor, detail)
    SELECT b.id, 'status', b.previous_status, b.status, b.cause, 'runtime', NULL
    FROM beat b
    WHERE b.status <> b.previous_status
    UNION ALL
    SELECT b.id, 'runtime', NULL, NULL, 'runtime_restarted', 'runtime',
           jsonb_build_object('uptime_seconds', b.uptime_seconds,
                              'previous_uptime_seconds', b.previous_uptime)
    FROM beat b
    WHERE b.restarted_at IS NOT NULL
),
-- Entering online (the box may have been replaced meanwhile) queues a reconcile, due now. So
-- does a runtime that restarted while online unasked, which may be a new box with none of its
-- plugins: its uptime went down with no restart handed out and still unacknowledged (one
-- acknowledged already does not explain a later drop), it registered again with no restart
-- handed out in the last $23 s, or it registered as another box (instance id) than before.
-- Due no sooner than $23 s after the workspace's last run was created, so a runtime restarting
-- in a loop costs one run a window, and a restart right after a run is still reconciled, a
-- little later. Whatever slips through (a new box within that window) is caught by the drift
-- check (registry/drift.py) once its report of its plugins stands still.
intent AS (
    INSERT INTO reconciles (workspace_id, trigger, next_attempt_at)
    SELECT b.id,
           CASE WHEN b.previous_status = ANY($18::text[]) THEN 'online_transition'
                ELSE 'runtime_restarted' END,
           CASE WHEN b.previous_status = ANY($18::text[]) THEN now()
                ELSE GREATEST(now(), (SELECT max(r.created_at) FROM reconciles r
                                      WHERE r.workspace_id = b.id)
                                     + make_interval(secs => $23)) END
    FROM beat b
    WHERE b.status = ANY($19::text[])
      AND (b.previous_status = ANY($18::text[])
           OR (b.previous_status = ANY($19::text[])
               AND (b.box_changed
                    -- The subqueries see the actions as they were before this statement
                    -- (its own acks included): pending means pending before this beat.
                    OR (b.restarted_at IS NOT NULL
                        AND NOT EXISTS (SELECT 1 FROM workspace_actions a
                                        WHERE a.workspace_id = b.id AND a.type = 'restart'
                                          AND a.delivered_at IS NOT NULL
                                          AND a.acked_at IS NULL))
                    OR (b.cause = 'register'
                        AND NOT EXISTS (SELECT 1 FROM workspace_actions a
                                        WHERE a.workspace_id = b.id AND a.type = 'restart'
                                          AND a.delivered_at > now()
                                              - make_interval(secs => $23))))))
    -- A queued run already covers this: fold into it, with its full attempt budget, due by
    -- the new cause's time even if it was waiting out a retry backoff (see
    -- reconciles.QUEUE_RECONCILE); a restart never pulls a run forward past its window.
    -- A fold returns the run's id too, so the beat wakes the reconciler for it.
    ON CONFLICT (workspace_id) WHERE status = 'queued' DO UPDATE SET
        attempt = 0, error = NULL, requested_at = now(),
        next_attempt_at = LEAST(reconciles.next_attempt_at, EXCLUDED.next_attempt_at)
    RETURNING id, workspace_id
),
acks AS (
    SELECT * FROM unnest($20::uuid[], $21::uuid[]) AS a(workspace_id, action_id)
),
-- Pending actions this beat settles: those it acknowledges, and every restart asked before
-- the box restarted on its own (a restart is a restart, whoever started it).
acking AS (
    SELECT a.id
    FROM beat b
    JOIN workspace_actions a ON a.workspace_id = b.id AND a.acked_at IS NULL
    WHERE a.id IN (SELECT k.action_id FROM acks k WHERE k.workspace_id = b.id)
       OR (a.type = 'restart' AND a.created_at < b.restarted_at)
),
acked AS (
    UPDATE workspace_actions a SET acked_at = now()
    FROM acking k
    WHERE a.id = k.id
),
-- Stamp the actions this answer hands out for the first time (not those acked just now:
-- one statement must not update a row twice), so a later install knows they may be done.
delivered AS (
    UPDATE workspace_actions a SET delivered_at = now()
    FROM beat b
    WHERE a.workspace_id = b.id AND a.acked_at IS NULL AND a.delivered_at IS NULL
      AND a.id NOT IN (SELECT id FROM acking)
)
SELECT
    t.id,
    t.previous_status,
    b.status,
    i.id AS reconcile_id,
    b.old_token,
    CASE WHEN b.id IS NULL THEN NULL ELSE (
        SELECT COALESCE(jsonb_agg(jsonb_build_object(
                   'id', a.id, 'type', a.type, 'reason', a.reason) ORDER BY a.created_at), '[]')
        FROM workspace_actions a
        WHERE a.workspace_id = b.id AND a.acked_at IS NULL
          AND a.id NOT IN (SELECT id FROM acking)
    ) END AS actions
FROM target t
LEFT JOIN beat b ON b.id = t.id
LEFT JOIN intent i ON i.workspace_id = t.id
"""


def _json(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


@dataclass(frozen=True, slots=True)
class BeatPolicy:
    """The settings the heartbeat statement applies."""

    # Gaps between beats longer than this are outages, not the runtime's interval.
    max_interval_s: float = 300.0
    # A runtime that restarted while online gets a reconcile, due at most this often.
    restart_reconcile_every_s: float = 300.0


DEFAULT_POLICY = BeatPolicy()


def arguments(beats: list[Beat], policy: BeatPolicy = DEFAULT_POLICY) -> list[Any]:
    """HEARTBEATS' parameters for a batch of beats, in order."""
    return [
        [b.workspace_id for b in beats],
        [b.token_hash for b in beats],
        [b.health.value for b in beats],
        [b.error_rate for b in beats],
        [b.sample_error for b in beats],
        [b.active_tasks for b in beats],
        [b.uptime_seconds for b in beats],
        [b.current_task for b in beats],
        [b.monthly_spend for b in beats],
        [b.runtime_state for b in beats],
        [_json(b.observed_plugins) for b in beats],
        [b.url for b in beats],
        [_json(b.agent_card) for b in beats],
        [b.cause for b in beats],
        _TABLE_HEALTH,
        _TABLE_FROM,
        _TABLE_TO,
        RECONCILE_ENTRY_FROM,
        LIVE_STATUSES,
        [b.workspace_id for b in beats for _ in b.acks],
        [ack for b in beats for ack in b.acks],
        policy.max_interval_s,
        policy.restart_reconcile_every_s,
        [b.instance_id for b in beats],
    ]


async def apply_beats(
    conn: Connection, beats: list[Beat], policy: BeatPolicy = DEFAULT_POLICY
) -> list[BeatResult]:
    """Apply beats for distinct workspaces; one result per beat, in order."""
    rows = await conn.fetch(HEARTBEATS, *arguments(beats, policy))
    found = {
        row["id"]: BeatResult(
            Status(row["previous_status"]),
            None if row["status"] is None else Status(row["status"]),
            row["reconcile_id"],
            row["actions"] or [],
            bool(row["old_token"]),
        )
        for row in rows
    }
    return [found.get(b.workspace_id, NOT_FOUND) for b in beats]


async def apply_beat(conn: Connection, beat: Beat) -> BeatResult:
    return (await apply_beats(conn, [beat]))[0]


# The current token, else the previous one: in its grace period it is a valid token used for
# another workspace (403); after it, a rotated token (401 token_rotated, not "unknown").
# Tombstones too (they are not in `workspaces`, so the beat matched nothing): a removed
# workspace's own token is answered 410 until the tombstone is pruned.
SELECT_TOKEN_OWNER = """
SELECT id, 'current' AS token, status = 'removed' AS removed
FROM all_workspaces WHERE token_hash = $1
UNION ALL
SELECT id, CASE WHEN previous_token_valid_until > now() THEN 'previous' ELSE 'rotated' END,
       status = 'removed'
FROM all_workspaces WHERE previous_token_hash = $1
LIMIT 1
"""

TokenState = Literal["current", "previous", "rotated"]


@dataclass(frozen=True, slots=True)
class TokenOwner:
    workspace_id: uuid.UUID
    token: TokenState
    removed: bool = False  # the token's workspace is a tombstone

    def is_removed(self, workspace_id: uuid.UUID) -> bool:
        """A token that still works, of this removed workspace: what a beat got 410 for when
        tombstones were rows of `workspaces`."""
        return self.removed and self.workspace_id == workspace_id and self.token != "rotated"


async def token_owner(conn: Connection, token_hash: bytes) -> TokenOwner | None:
    """Slow path for a beat that matched nothing: whose token is this, if anyone's?"""
    row = await conn.fetchrow(SELECT_TOKEN_OWNER, token_hash)
    return None if row is None else TokenOwner(row["id"], row["token"], row["removed"])
