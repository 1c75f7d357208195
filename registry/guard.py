"""The mass-expiry guard's judgement: how many silent workspaces one sweep may take offline.

A pure function of the fleet's figures and what the guard recorded at the previous sweep, so
every rule is testable without a database and the sweeper only carries the result out.

Why these rules (issue 13): after an outage the fleet calls back in over a spread of seconds
(runtimes back off, 1 s to 16 s and more). The guard used to release the moment the silent
share dipped under its threshold and then expire every remaining silent workspace in one
sweep, the healthy ones still backing off among them. So:
- it trips as before, when the silent ones plus the window's expirations are more than the
  share of the fleet as it was a window ago (the live ones plus those expirations): it judges
  a sliding window, not one sweep, since an outage spread over several sweeps looks small in
  each, yet takes the fleet;
- while it holds and the silent count is still changing (within the last liveness window),
  it expires nobody: a fleet that is calling back in, or still going quiet, is not judged yet;
  once the count has been steady for a window, it expires slowly (the rate: a partition or a
  registry outage looks like a dead fleet, so a mistake costs a few workspaces, not all);
- it releases only below a lower share (hysteresis) and only once the count is steady;
- after release it keeps expiring at the rate for one more window (no cliff).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True, slots=True)
class GuardRules:
    share: float  # trips above this share of the fleet silent or just expired
    release_share: float  # releases at or below this share (at most `share`)
    min_fleet: int  # a smaller fleet is never guarded
    rate: float  # while holding or cooling: max(1, rate x fleet) per sweep
    window_s: float  # the liveness window: how long "steady" and "cooling" last


@dataclass(frozen=True, slots=True)
class Before:
    """What the guard recorded at the previous sweep."""

    holding: bool
    stale: int  # silent live workspaces left after the previous sweep
    silent_changed_at: datetime | None
    released_at: datetime | None


@dataclass(frozen=True, slots=True)
class Judgement:
    holding: bool
    limit: int  # how many may go offline this sweep
    silent_changed_at: datetime | None
    released_at: datetime | None

    @property
    def cooling(self) -> bool:
        """Released, but still rate-limited."""
        return not self.holding and self.released_at is not None


def judge(
    rules: GuardRules, before: Before, *, live: int, silent: int, expired: int, now: datetime
) -> Judgement:
    """The guard's state and this sweep's expiry limit, for `live` workspaces of which
    `silent` are silent, `expired` having been taken offline within the last window."""
    window = timedelta(seconds=rules.window_s)
    # Expirations lower the count too, but they are the guard's own doing: the previous
    # sweep recorded the count after its expirations, so only heartbeats (or new silences)
    # make these differ.
    changed_at = now if silent != before.stale else before.silent_changed_at
    steady = changed_at is None or now - changed_at >= window
    fleet = live + expired
    rate = max(1, math.floor(rules.rate * fleet))
    cooling_since = before.released_at
    if cooling_since is not None and now - cooling_since >= window:
        cooling_since = None
    if fleet == 0 or fleet < rules.min_fleet:
        return Judgement(False, silent, changed_at, None)
    share = (silent + expired) / fleet
    # Holding, it lets go only below the lower share and once the count is steady.
    holding = (share > rules.release_share or not steady) if before.holding else share > rules.share
    if holding:
        return Judgement(True, rate if steady else 0, changed_at, None)
    if before.holding:
        cooling_since = now  # released just now: one more window at the rate
    if cooling_since is not None:
        return Judgement(False, min(silent, rate), changed_at, cooling_since)
    return Judgement(False, silent, changed_at, None)
