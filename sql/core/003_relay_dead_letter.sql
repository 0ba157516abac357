-- walsaga core schema, version 3: events Kafka refused for good.
--
-- When Kafka refuses an event that will never be accepted as it is (larger
-- than the producer's or the broker's limit, a record the broker rejects),
-- the relay publishes a small record about it to its dead-letter topic, lets
-- the events after it flow, and writes a row here in the source database:
-- outbox retention keeps the event's outbox row while this row exists, and
-- `walsaga relay replay --id` re-publishes it once the cause is fixed. An
-- event with no outbox row (a logical message, capture mode "message") is
-- kept here in full.
CREATE TABLE walsaga.relay_dead_letter (
    event_id    text        PRIMARY KEY,
    source      text        NOT NULL,
    lsn         pg_lsn      NOT NULL,
    xid         bigint,
    topic       text        NOT NULL,
    key         text        NOT NULL,
    type        text        NOT NULL,
    reason      text        NOT NULL,
    code        text        NOT NULL,
    size_bytes  bigint      NOT NULL,
    -- The whole event (payload, headers) when there is no outbox row to keep.
    event       jsonb,
    -- The id of the next event of the same key, which carried header walsaga.gap.
    gap_reported_by text,
    refused_at  timestamptz NOT NULL DEFAULT now(),
    replayed_at timestamptz
);
CREATE INDEX relay_dead_letter_refused_at ON walsaga.relay_dead_letter (refused_at);
