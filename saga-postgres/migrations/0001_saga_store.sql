-- The saga store: instances, history, outbox, inbox.
-- Instance times are Unix milliseconds (bigint): they come from the engine's
-- clock (which tests drive by hand) and must round-trip exactly. Outbox
-- leases and inbox / sent times come from the database clock (timestamptz),
-- so several replicas agree on them.

CREATE TABLE saga_instances (
    id                 uuid PRIMARY KEY,
    definition         text   NOT NULL,
    definition_version bigint NOT NULL,
    key                text,
    status             text   NOT NULL,
    step               bigint NOT NULL,
    attempt            bigint NOT NULL,
    awaiting           text,
    deadline           bigint,
    failure            text,
    -- json, not jsonb: it keeps the engine's bytes exactly (jsonb would
    -- reformat them); cast to jsonb in queries or expression indexes.
    data               json   NOT NULL,
    data_version       bigint NOT NULL,
    revision           bigint NOT NULL,
    created_at         bigint NOT NULL,
    updated_at         bigint NOT NULL
) WITH (fillfactor = 90);

CREATE UNIQUE INDEX saga_instances_key ON saga_instances (definition, key) WHERE key IS NOT NULL;
CREATE INDEX saga_instances_deadline ON saga_instances (deadline) WHERE deadline IS NOT NULL;
-- No index on updated_at: it changes on every transition, and leaving it
-- unindexed lets transitions that keep the deadline be HOT updates (hence
-- the fillfactor). Operator listings scan.

CREATE TABLE saga_history (
    saga_id  uuid   NOT NULL,
    revision bigint NOT NULL,
    at       bigint NOT NULL,
    cause    jsonb  NOT NULL,
    before   jsonb,
    after    jsonb  NOT NULL,
    emitted  jsonb  NOT NULL,
    note     text,
    PRIMARY KEY (saga_id, revision)
);

CREATE TABLE saga_outbox (
    id             bigserial PRIMARY KEY,
    saga_id        uuid,
    message_id     text   NOT NULL,
    kind           text   NOT NULL,
    destination    text   NOT NULL,
    correlation_id text,
    created_at     bigint NOT NULL,
    headers        jsonb  NOT NULL,
    payload        bytea  NOT NULL,
    claimed_until  timestamptz,
    sent_at        timestamptz
);

-- Claims scan unsent rows in id order and check earlier unsent rows of the same saga.
CREATE INDEX saga_outbox_unsent ON saga_outbox (id) WHERE sent_at IS NULL;
CREATE INDEX saga_outbox_unsent_saga ON saga_outbox (saga_id, id) WHERE sent_at IS NULL AND saga_id IS NOT NULL;
CREATE INDEX saga_outbox_sent ON saga_outbox (sent_at) WHERE sent_at IS NOT NULL;

CREATE TABLE saga_inbox (
    consumer    text        NOT NULL,
    message_id  text        NOT NULL,
    consumed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);

-- Rows arrive in time order, so a BRIN index serves retention at almost no write cost.
CREATE INDEX saga_inbox_consumed ON saga_inbox USING brin (consumed_at);
