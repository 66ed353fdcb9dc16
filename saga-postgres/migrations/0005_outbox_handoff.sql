-- Each saga's newest outbox row, so a transition can tell whether all of
-- its saga's earlier messages are sent (a saga's messages are marked sent in
-- order) and lease its own messages to this process's relay as it commits
-- them, sparing the relay a claim. Not indexed: transitions stay HOT.
ALTER TABLE saga_instances ADD COLUMN last_outbox_id bigint;
UPDATE saga_instances i SET last_outbox_id = o.id
FROM (SELECT saga_id, max(id) AS id FROM saga_outbox WHERE saga_id IS NOT NULL GROUP BY saga_id) o
WHERE i.id = o.saga_id;
