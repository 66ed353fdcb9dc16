-- A message consumed by the transition it caused (the engine's case) is
-- recorded on that transition's history row instead of in saga_inbox: the
-- history row is written anyway, so a transition writes one row (and its
-- index entries) fewer. The unique index is the inbox's duplicate check for
-- these messages; messages consumed without a transition (participants)
-- stay in saga_inbox. These keys live as long as the history rows.
ALTER TABLE saga_history ADD COLUMN consumer text, ADD COLUMN message_id text;
CREATE UNIQUE INDEX saga_history_consumed ON saga_history (consumer, message_id) WHERE message_id IS NOT NULL;
