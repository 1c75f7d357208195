-- Heartbeats update every workspace row every few seconds. Leaving a fifth of each page free
-- lets PostgreSQL put the new row version on the same page (a HOT update: no index
-- maintenance) instead of wherever there is room. Applies to pages written from now on.
ALTER TABLE workspaces SET (fillfactor = 80);
