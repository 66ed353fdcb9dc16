-- One index on unsent outbox rows instead of two: every message written paid
-- for an entry in both. Claims find a saga's earlier unsent rows (the
-- barrier that keeps a saga's messages in order across relays) through the
-- (id) index: such a row has a smaller id than the row claimed, so the
-- search stops at the batch's last id.
DROP INDEX IF EXISTS saga_outbox_unsent_saga;
