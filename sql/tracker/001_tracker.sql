-- walsaga tracker component, version 1: the saga tracker's own database.
-- Needs the core component (the tracker is a participant: its inbox).
-- Applied by `walsaga tracker` when it starts (the database is its own).

-- One row per saga seen, of either style: its type, status, and when it
-- started, last moved and ended. A saga past its deadline without an end is
-- stuck. Orchestrated sagas (`orchestrator` set) take their status from
-- their orchestrator's walsaga.saga; choreographies from their events.
CREATE TABLE walsaga.tracked_saga (
    id            text             PRIMARY KEY,
    saga_type     text,
    orchestrator  text,
    status        text             NOT NULL CHECK (status IN
                      ('RUNNING', 'COMPENSATING', 'COMPLETED', 'COMPENSATED', 'FAILED',
                       'RESOLVED')),
    reason        text,
    step          text,
    waiting_on    text,
    started_at    timestamptz      NOT NULL,
    last_event_at timestamptz      NOT NULL,
    ended_at      timestamptz,
    deadline_s    double precision NOT NULL,
    deadline      timestamptz      NOT NULL,
    events        int              NOT NULL DEFAULT 0,
    last_type     text,
    trace_id      text,
    updated_at    timestamptz      NOT NULL DEFAULT now()
) WITH (fillfactor = 70);  -- room on each page: a saga's next record updates it in place (HOT)
-- Live sagas by deadline: the stuck ones are a range scan.
CREATE INDEX tracked_saga_live ON walsaga.tracked_saga (deadline) WHERE ended_at IS NULL;
CREATE INDEX tracked_saga_started ON walsaga.tracked_saga (started_at DESC);
CREATE INDEX tracked_saga_status ON walsaga.tracked_saga (status, started_at DESC);
CREATE INDEX tracked_saga_type ON walsaga.tracked_saga (saga_type, started_at DESC);
CREATE INDEX tracked_saga_ended ON walsaga.tracked_saga (ended_at) WHERE ended_at IS NOT NULL;

-- Every record of every saga: what was sent, by which service, where it sat
-- in Kafka, the relay's lsn and the headers. One row per event id: a record
-- delivered again changes nothing.
CREATE TABLE walsaga.saga_event (
    saga_id     text        NOT NULL,
    event_id    text        NOT NULL,
    at          timestamptz NOT NULL,   -- the record's timestamp
    received_at timestamptz NOT NULL DEFAULT now(),
    type        text,
    kind        text        NOT NULL CHECK (kind IN ('command', 'compensation', 'event')),
    source      text,
    topic       text        NOT NULL,
    partition   int         NOT NULL,
    "offset"    bigint      NOT NULL,
    key         text,
    lsn         text,
    step        text,
    headers     jsonb       NOT NULL,
    payload     jsonb,
    PRIMARY KEY (saga_id, event_id)
);

-- How far the tracker has read each orchestrator's walsaga.saga: the last
-- row read (by updated_at, id), and whether that read had caught up (then the
-- next one starts a little earlier, for transactions that committed late).
CREATE TABLE walsaga.tracker_cursor (
    orchestrator text        PRIMARY KEY,
    updated_at   timestamptz NOT NULL,
    id           text        NOT NULL,
    caught_up    boolean     NOT NULL
);
