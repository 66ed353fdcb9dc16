-- Indexes behind QueryStore::summary (the operators' dashboard), so it reads
-- what is in flight and what finished lately without scanning either table.
--
-- Unfinished instances: few at any time (those in flight). Indexing status
-- alone keeps transitions that leave the status as it is HOT updates; only a
-- change of status (which mostly changes the deadline too) is not.
CREATE INDEX saga_instances_unfinished ON saga_instances (status)
    WHERE status IN ('running', 'compensating', 'needs_attention');

-- Outcomes: transitions into completed, compensated or needs attention, one
-- or so per instance, appended in time order. Per-minute counts read one
-- range of it; the most recently finished instances are its last entries.
-- The predicate is repeated word for word by the queries that use it.
CREATE INDEX saga_history_outcomes ON saga_history (at, saga_id)
    WHERE after->>'status' IN ('completed', 'compensated', 'needs_attention')
      AND (before IS NULL OR before->>'status' IS DISTINCT FROM after->>'status');
