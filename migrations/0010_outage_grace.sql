-- Grace after an outage, and a guard that lets go gently (issue 13).
--
-- The start-up grace window covered a registry that started; it did not cover a database that
-- came back under a running registry: the first sweep then judged a fleet whose heartbeats had
-- all been refused. `silence_counted_from` is when the registry could hear again (the first
-- sweep after the database came back, or after no process had swept for a while); the sweeper
-- counts nobody's silence from before it, so every workspace gets one liveness window.
ALTER TABLE fleet_guard ADD COLUMN silence_counted_from timestamptz;

-- The guard released the moment the silent share dipped under its threshold and then
-- expired every silent workspace in one sweep. It now remembers when the silent count last
-- changed (it holds, expiring nobody, while the fleet is still calling back in) and when it
-- released (it keeps rate-limiting for one more window after).
ALTER TABLE fleet_guard ADD COLUMN silent_changed_at timestamptz;
ALTER TABLE fleet_guard ADD COLUMN released_at timestamptz;
