"""The mass-expiry guard's rules (registry/guard.py), sweep by sweep, without a database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from registry.guard import Before, GuardRules, Judgement, judge

RULES = GuardRules(share=0.3, release_share=0.1, min_fleet=10, rate=0.01, window_s=5.0)
T0 = datetime(2026, 1, 1, tzinfo=UTC)
FLEET = 200
RATE = 2  # max(1, 1% of 200)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def after(judgement: Judgement, stale: int) -> Before:
    """What the next sweep reads: this judgement, and the silent count it left."""
    return Before(judgement.holding, stale, judgement.silent_changed_at, judgement.released_at)


QUIET = Before(holding=False, stale=0, silent_changed_at=None, released_at=None)


def test_a_fleet_going_silent_trips_the_guard_which_judges_nobody_until_the_count_is_steady() -> (
    None
):
    tripped = judge(RULES, QUIET, live=FLEET, silent=150, expired=0, now=at(0))
    still_changing = judge(RULES, after(tripped, 150), live=FLEET, silent=150, expired=0, now=at(4))
    steady = judge(RULES, after(tripped, 150), live=FLEET, silent=150, expired=0, now=at(5))

    assert (tripped.holding, tripped.limit) == (True, 0)
    assert (still_changing.holding, still_changing.limit) == (True, 0)
    assert (steady.holding, steady.limit) == (True, RATE)


def test_while_the_fleet_calls_back_in_the_guard_holds_and_expires_nobody() -> None:
    steady = Before(holding=True, stale=150, silent_changed_at=at(-60), released_at=None)
    falling = judge(RULES, steady, live=FLEET, silent=90, expired=0, now=at(0))
    # Below the release share, but the count only just stopped falling: still holding.
    low = judge(RULES, after(falling, 10), live=FLEET, silent=10, expired=0, now=at(3))

    assert (falling.holding, falling.limit) == (True, 0)
    assert (low.holding, low.limit) == (True, 0)


def test_the_guard_releases_only_at_the_lower_share() -> None:
    steady = Before(holding=True, stale=40, silent_changed_at=at(-60), released_at=None)
    # 20% silent, under the 30% that trips it, over the 10% that releases it: it holds.
    between = judge(RULES, steady, live=FLEET, silent=40, expired=0, now=at(0))
    low = Before(holding=True, stale=20, silent_changed_at=at(-60), released_at=None)
    below = judge(RULES, low, live=FLEET, silent=20, expired=0, now=at(0))

    assert (between.holding, between.limit) == (True, RATE)
    assert (below.holding, below.released_at) == (False, at(0))


def test_after_release_the_guard_keeps_the_rate_for_one_more_window() -> None:
    steady = Before(holding=True, stale=20, silent_changed_at=at(-60), released_at=None)
    released = judge(RULES, steady, live=FLEET, silent=20, expired=0, now=at(0))
    cooling = judge(RULES, after(released, 18), live=FLEET - 2, silent=18, expired=2, now=at(4))
    done = judge(RULES, after(cooling, 16), live=FLEET - 4, silent=16, expired=0, now=at(5.5))

    assert (released.holding, released.limit) == (False, RATE)  # not all 20 at once
    assert (cooling.holding, cooling.limit, cooling.cooling) == (False, RATE, True)
    assert (done.holding, done.limit, done.cooling) == (False, 16, False)


def test_below_the_share_and_the_minimum_fleet_every_silent_workspace_expires() -> None:
    small = judge(RULES, QUIET, live=8, silent=8, expired=0, now=at(0))
    few = judge(RULES, QUIET, live=FLEET, silent=50, expired=0, now=at(0))

    assert (small.holding, small.limit) == (False, 8)
    assert (few.holding, few.limit) == (False, 50)
