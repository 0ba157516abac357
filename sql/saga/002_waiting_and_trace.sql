-- walsaga saga component, version 2: what a saga waits on, since when, its trace.
--
-- A step whose command is unanswered is resent now and then, and given up
-- only after a long time (minutes): these columns let operators and metrics
-- see which sagas wait on which participant and for how long, and let the
-- orchestrator tell a participant that is down (many sagas waiting, nothing
-- heard from it) from one that ignores a single command.
ALTER TABLE walsaga.saga
    ADD COLUMN waiting_on      text,         -- the topic of the command awaiting an answer
    ADD COLUMN step_started_at timestamptz,  -- when that command was first sent
    -- The trace context of the saga's latest hop (W3C traceparent, tracestate):
    -- a command resent after a deadline continues it.
    ADD COLUMN traceparent     text,
    ADD COLUMN tracestate      text;

-- RESOLVED: a person finished the saga by hand (`walsaga sagas resolve`).
ALTER TABLE walsaga.saga DROP CONSTRAINT saga_status_check;
ALTER TABLE walsaga.saga ADD CONSTRAINT saga_status_check CHECK (status IN
    ('RUNNING', 'COMPENSATING', 'COMPLETED', 'COMPENSATED', 'FAILED', 'RESOLVED'));

CREATE INDEX saga_waiting ON walsaga.saga (waiting_on)
    WHERE status IN ('RUNNING', 'COMPENSATING') AND waiting_on IS NOT NULL;

-- When each participant (by the topic its commands go to) last answered any
-- saga of this orchestrator. Written at most about once a second per topic.
CREATE TABLE walsaga.saga_participant (
    command_topic  text        PRIMARY KEY,
    last_answer_at timestamptz NOT NULL
);
