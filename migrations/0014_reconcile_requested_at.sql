-- When the latest request a run answers was made (issue 13). A fan-out to 200 workspaces
-- resolved the plugin's ref 200 times; a resolution that started after a run's request
-- answers that run as well as a fresh one, so runs share it, and they need to know when they
-- were asked. Every statement that folds a request into a queued run sets it again (a later
-- request must not be answered by an earlier resolution). Existing rows get the time of this
-- migration: later than their requests, which only makes them share less.
ALTER TABLE reconciles ADD COLUMN requested_at timestamptz NOT NULL DEFAULT now();
