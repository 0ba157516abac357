-- walsaga core schema, version 1: the outbox, explicit publishing, the inbox.
-- Applied by `walsaga deploy` inside one transaction; never edit a released
-- file, add a new numbered one instead.

CREATE SCHEMA IF NOT EXISTS walsaga;

-- One row per event. Column names follow Debezium's outbox event router.
-- The relay reads inserts from the WAL, not from this table: rows stay only
-- for `walsaga relay replay` and are removed after the relay's retention.
-- created_at must keep its default (the inserting transaction's start time).
CREATE TABLE walsaga.outbox (
    id            uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    aggregatetype text        NOT NULL,
    aggregateid   text        NOT NULL,
    type          text        NOT NULL,
    payload       jsonb       NOT NULL DEFAULT '{}'::jsonb,
    headers       jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at    timestamptz NOT NULL DEFAULT now()
);
-- BRIN: nearly free to maintain on an append-only table, enough for
-- retention deletes and replay-from-time scans.
CREATE INDEX outbox_created_at ON walsaga.outbox USING brin (created_at);

COMMENT ON TABLE walsaga.outbox IS
    'walsaga outbox: one row per event, published to Kafka by walsaga relay from the WAL';

-- Emit an event from application code, in the caller's transaction.
CREATE FUNCTION walsaga.publish(
    aggregatetype text,
    aggregateid   text,
    type          text,
    payload       jsonb,
    headers       jsonb DEFAULT '{}'::jsonb
) RETURNS uuid
LANGUAGE sql
AS $$
    INSERT INTO walsaga.outbox (aggregatetype, aggregateid, type, payload, headers)
    VALUES ($1, $2, $3, coalesce($4, '{}'::jsonb), coalesce($5, '{}'::jsonb))
    RETURNING id
$$;

-- Table-less mode: the same event as a transactional logical message with
-- prefix 'walsaga'. Nothing is stored; the event exists only in the WAL.
CREATE FUNCTION walsaga.emit(
    aggregatetype text,
    aggregateid   text,
    type          text,
    payload       jsonb,
    headers       jsonb DEFAULT '{}'::jsonb
) RETURNS uuid
LANGUAGE plpgsql
AS $$
DECLARE
    event_id uuid := gen_random_uuid();
BEGIN
    PERFORM pg_logical_emit_message(
        true,
        'walsaga',
        jsonb_build_object(
            'id', event_id,
            'aggregatetype', aggregatetype,
            'aggregateid', aggregateid,
            'type', type,
            'payload', coalesce(payload, '{}'::jsonb),
            'headers', coalesce(headers, '{}'::jsonb)
        )::text
    );
    RETURN event_id;
END
$$;

-- Processed message ids per consumer: a participant inserts here in the same
-- transaction as its handler's writes, so a repeated message is skipped.
CREATE TABLE walsaga.inbox (
    consumer     text        NOT NULL,
    message_id   text        NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);
CREATE INDEX inbox_processed_at ON walsaga.inbox USING brin (processed_at);

-- Capture triggers installed by `walsaga deploy --spec`, one row per spec
-- entry and operation, so re-applying a spec is a no-op and --drop is exact.
CREATE TABLE walsaga.capture (
    entry         text        NOT NULL,
    operation     text        NOT NULL CHECK (operation IN ('insert', 'update', 'delete')),
    table_name    text        NOT NULL,
    trigger_name  text        NOT NULL,
    function_name text        NOT NULL,
    definition    text        NOT NULL,
    spec_file     text,
    installed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (entry, operation)
);

-- Replication slots the relay created, so a slot that disappears is noticed
-- instead of being silently recreated (events written meanwhile would be lost).
CREATE TABLE walsaga.relay_slot (
    slot_name     text        PRIMARY KEY,
    created_at    timestamptz NOT NULL DEFAULT now(),
    confirmed_lsn pg_lsn,
    seen_at       timestamptz
);
