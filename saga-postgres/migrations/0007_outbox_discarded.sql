-- When an operator gave up an unsent message (`Transaction::discard_unsent`)
-- rather than the broker confirming it. Its `sent_at` is set too, so every
-- unsent-row predicate (claims, the hand-off check, the operator's listing,
-- retention) treats it as done. Nullable with no default: adding it
-- rewrites nothing, and a row of the hot path carries only a null bit.
ALTER TABLE saga_outbox ADD COLUMN discarded_at timestamptz;
