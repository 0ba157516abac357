-- walsaga effects component, version 1: calls outside the database, made
-- through rows. Needs the core component. Installed by `walsaga effects
-- --install` (or `walsaga.schema.apply(conn, 'effects')`).
--
-- A step that must call something outside its database (an identity
-- provider, a mail server, a payment gateway) writes an effect request here,
-- in the same transaction as its other writes. An effect worker (any number
-- of instances: they share the queue with FOR UPDATE SKIP LOCKED) performs
-- it outside any transaction, and records the outcome in this database in a
-- transaction that also writes the outcome event to the outbox.

CREATE TABLE walsaga.effect (
    id              uuid        PRIMARY KEY DEFAULT walsaga.uuid_v7(),
    -- What to call: the name of a target the effect worker knows.
    target          text        NOT NULL,
    -- Derived from the saga and the step: one effect per key, however often
    -- it is requested; sent to providers that deduplicate by a key of theirs.
    idempotency_key text        NOT NULL UNIQUE,
    payload         jsonb       NOT NULL DEFAULT '{}'::jsonb,
    -- Headers the outcome event carries (saga_id, saga_type, causation_id,
    -- and the requesting transaction's traceparent and tracestate).
    headers         jsonb       NOT NULL DEFAULT '{}'::jsonb,
    -- The outcome event's aggregate id (its Kafka key).
    aggregate_id    text        NOT NULL,
    -- PENDING: to be called when due, nothing sent or known not done.
    -- SENT: a worker is calling it now (leased_until bounds the call).
    -- IN_DOUBT: an attempt may have taken effect (timed out, connection lost,
    --   server error, or the worker died after sending: a SENT row whose
    --   lease ran out); it is resolved before any new attempt.
    -- DONE, REFUSED (a business refusal), FAILED (retries ran out): ended.
    status          text        NOT NULL DEFAULT 'PENDING' CHECK (status IN
                        ('PENDING', 'SENT', 'IN_DOUBT', 'DONE', 'REFUSED', 'FAILED')),
    attempts        int         NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    leased_by       text,
    leased_until    timestamptz,
    sent_at         timestamptz,            -- when the latest attempt was sent
    result          jsonb,                  -- what the provider answered (DONE)
    reason          text,                   -- why it was refused or failed
    last_error      text,                   -- the latest failed attempt's error
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    ended_at        timestamptz
);
-- The queue: only live requests are indexed.
CREATE INDEX effect_due ON walsaga.effect (next_attempt_at)
    WHERE status IN ('PENDING', 'SENT', 'IN_DOUBT');
CREATE INDEX effect_ended ON walsaga.effect (ended_at) WHERE ended_at IS NOT NULL;

COMMENT ON TABLE walsaga.effect IS
    'walsaga effects: calls outside the database, performed by walsaga effect workers';

-- Request an effect in the caller's transaction; returns the request's id.
-- The transaction's trace context (walsaga.traceparent) goes into its headers.
-- A second request with the same idempotency key changes nothing and
-- returns the first one's id. Workers are woken by NOTIFY walsaga_effect.
CREATE FUNCTION walsaga.request_effect(
    target          text,
    idempotency_key text,
    payload         jsonb DEFAULT '{}'::jsonb,
    headers         jsonb DEFAULT '{}'::jsonb,
    aggregate_id    text  DEFAULT NULL
) RETURNS uuid
LANGUAGE plpgsql
AS $$
DECLARE
    found_id uuid;
BEGIN
    INSERT INTO walsaga.effect AS e (target, idempotency_key, payload, headers, aggregate_id)
    VALUES (request_effect.target, request_effect.idempotency_key,
            coalesce(request_effect.payload, '{}'::jsonb),
            walsaga.trace_headers() || coalesce(request_effect.headers, '{}'::jsonb),
            coalesce(request_effect.aggregate_id, request_effect.headers->>'saga_id',
                     request_effect.idempotency_key))
    ON CONFLICT ON CONSTRAINT effect_idempotency_key_key DO NOTHING
    RETURNING e.id INTO found_id;
    IF found_id IS NULL THEN
        SELECT e.id INTO found_id FROM walsaga.effect e
        WHERE e.idempotency_key = request_effect.idempotency_key;
    ELSE
        PERFORM pg_notify('walsaga_effect', request_effect.target);
    END IF;
    RETURN found_id;
END
$$;

-- The same for a step of a saga: the key is derived from the saga and the
-- step ('<saga_id>/<step>'), and the outcome event carries the saga's headers.
CREATE FUNCTION walsaga.request_saga_effect(
    target    text,
    saga_id   text,
    step      text,
    payload   jsonb DEFAULT '{}'::jsonb,
    saga_type text  DEFAULT NULL
) RETURNS uuid
LANGUAGE sql
AS $$
    SELECT walsaga.request_effect(
        target,
        saga_id || '/' || step,
        payload,
        jsonb_strip_nulls(jsonb_build_object('saga_id', saga_id, 'saga_type', saga_type)),
        saga_id)
$$;

-- Where an effect is: its status, result and reason (NULL columns when unknown).
CREATE FUNCTION walsaga.effect_status(idempotency_key text)
RETURNS TABLE (status text, attempts int, result jsonb, reason text)
LANGUAGE sql STABLE
AS $$
    SELECT e.status, e.attempts, e.result, e.reason FROM walsaga.effect e
    WHERE e.idempotency_key = effect_status.idempotency_key
$$;
