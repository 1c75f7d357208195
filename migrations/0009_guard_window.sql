-- A mass-expiry guard that sees gradual outages (issue 12). It compared the silent count of
-- one sweep with the live fleet, so an outage spread over a few sweeps (heartbeats stopping
-- over 20 s) expired a third of the fleet before it held. The sweeper now records how many it
-- took offline in each sweep, and the guard counts those of the last liveness window with the
-- silent ones. One row per sweep that expired something; the sweeper deletes rows older than
-- its window, so the table stays a few rows long.
CREATE TABLE fleet_expirations (
    at timestamptz NOT NULL DEFAULT now(),
    n  integer NOT NULL CHECK (n > 0)
);
CREATE INDEX fleet_expirations_at_idx ON fleet_expirations (at);

-- The guard's figures: expirations within the window, beside live and silent (`stale`).
ALTER TABLE fleet_guard ADD COLUMN expired integer NOT NULL DEFAULT 0;
