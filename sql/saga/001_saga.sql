-- walsaga saga component, version 1: orchestrated saga state, its permanent
-- log, and the isolation countermeasures participants use (semantic locks,
-- reservations that expire). Needs the core component. Applied by
-- `walsaga deploy --with saga`.

-- One row per saga instance, owned by the orchestrator's database. Instances
-- of the orchestrator keep nothing in memory between messages: this row is
-- the saga, read and written under FOR UPDATE.
CREATE TABLE walsaga.saga (
    id          text        PRIMARY KEY,
    definition  text        NOT NULL,
    version     int         NOT NULL,
    status      text        NOT NULL CHECK (status IN
                    ('RUNNING', 'COMPENSATING', 'COMPLETED', 'COMPENSATED', 'FAILED')),
    step        int         NOT NULL,   -- index of the step in progress
    completed   int         NOT NULL DEFAULT 0,  -- how many steps succeeded
    attempt     int         NOT NULL DEFAULT 0,  -- attempt of the current step's command
    refusals    int         NOT NULL DEFAULT 0,  -- explicit refusals of the current compensation
    data        jsonb       NOT NULL,
    deadline    timestamptz,            -- when the current command times out
    reason      text,                   -- why it compensated or failed
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    ended_at    timestamptz
);
-- Only live sagas have deadlines worth scanning.
CREATE INDEX saga_deadline ON walsaga.saga (deadline)
    WHERE status IN ('RUNNING', 'COMPENSATING');
CREATE INDEX saga_status ON walsaga.saga (definition, status);

-- Everything that happened to a saga, in order; never updated or deleted.
CREATE TABLE walsaga.saga_log (
    saga_id text        NOT NULL,
    seq     bigint      GENERATED ALWAYS AS IDENTITY,
    at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    kind    text        NOT NULL,
    step    text,
    detail  jsonb       NOT NULL DEFAULT '{}'::jsonb,
    PRIMARY KEY (saga_id, seq)
);

CREATE FUNCTION walsaga.saga_log_is_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'walsaga.saga_log is append-only (% refused)', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER saga_log_append_only BEFORE UPDATE OR DELETE OR TRUNCATE
    ON walsaga.saga_log FOR EACH STATEMENT
    EXECUTE FUNCTION walsaga.saga_log_is_append_only();

-- Semantic locks: a saga marks a resource as in use by it; other sagas see
-- the mark and refuse (or wait) instead of reading a half-done state. A lock
-- may carry an expiry so a saga that vanished cannot hold it for ever.
CREATE TABLE walsaga.semantic_lock (
    resource    text        PRIMARY KEY,
    saga_id     text        NOT NULL,
    acquired_at timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz
);

-- Returns true when `saga` holds `resource` afterwards (taken now, already
-- held by it, or taken over from an expired holder), false when another
-- saga holds it.
CREATE FUNCTION walsaga.acquire_lock(resource text, saga text, ttl interval DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    holder text;
BEGIN
    INSERT INTO walsaga.semantic_lock AS l (resource, saga_id, expires_at)
    VALUES (acquire_lock.resource, acquire_lock.saga, now() + ttl)
    ON CONFLICT ON CONSTRAINT semantic_lock_pkey DO UPDATE
        SET saga_id = EXCLUDED.saga_id, acquired_at = now(), expires_at = EXCLUDED.expires_at
        WHERE l.saga_id = EXCLUDED.saga_id OR l.expires_at < now()
    RETURNING l.saga_id INTO holder;
    RETURN holder IS NOT NULL;
END
$$;

CREATE FUNCTION walsaga.release_lock(resource text, saga text) RETURNS boolean
LANGUAGE sql AS $$
    WITH gone AS (
        DELETE FROM walsaga.semantic_lock l
        WHERE l.resource = release_lock.resource AND l.saga_id = release_lock.saga
        RETURNING 1
    )
    SELECT count(*) > 0 FROM gone
$$;

-- Reservations: a quantity of a resource set aside for a saga, counted
-- against the resource's capacity, released automatically unless confirmed
-- before it expires (a short-term, timeout-based lock).
CREATE TABLE walsaga.reservation (
    id          text        PRIMARY KEY,   -- chosen by the caller: idempotent
    resource    text        NOT NULL,
    quantity    numeric     NOT NULL CHECK (quantity >= 0),
    saga_id     text,
    status      text        NOT NULL CHECK (status IN
                    ('RESERVED', 'CONFIRMED', 'RELEASED', 'EXPIRED')),
    expires_at  timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX reservation_resource ON walsaga.reservation (resource)
    WHERE status IN ('RESERVED', 'CONFIRMED');
CREATE INDEX reservation_expiry ON walsaga.reservation (expires_at)
    WHERE status = 'RESERVED';

-- Reserve `quantity` of `resource` if what is held (reserved or confirmed)
-- plus it stays within `capacity`. Serialised per resource with a
-- transaction-level advisory lock, so concurrent sagas cannot over-commit.
-- Returns the reservation's status: 'RESERVED' (or its earlier status when
-- the same id was reserved before), or NULL when the capacity is exceeded.
CREATE FUNCTION walsaga.reserve(
    id text, resource text, quantity numeric, capacity numeric,
    saga text DEFAULT NULL, ttl interval DEFAULT NULL
) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    earlier text;
    held numeric;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('walsaga.reservation:' || reserve.resource, 0));
    SELECT r.status INTO earlier FROM walsaga.reservation r WHERE r.id = reserve.id;
    IF FOUND THEN
        RETURN earlier;
    END IF;
    SELECT coalesce(sum(r.quantity), 0) INTO held FROM walsaga.reservation r
    WHERE r.resource = reserve.resource AND r.status IN ('RESERVED', 'CONFIRMED')
      AND (r.expires_at IS NULL OR r.status = 'CONFIRMED' OR r.expires_at > now());
    IF held + reserve.quantity > reserve.capacity THEN
        RETURN NULL;
    END IF;
    INSERT INTO walsaga.reservation (id, resource, quantity, saga_id, status, expires_at)
    VALUES (reserve.id, reserve.resource, reserve.quantity, reserve.saga, 'RESERVED',
            now() + reserve.ttl);
    RETURN 'RESERVED';
END
$$;

-- Confirm a reservation that has not expired; returns its status afterwards
-- ('CONFIRMED', or 'EXPIRED'/'RELEASED' when it is too late), NULL if unknown.
CREATE FUNCTION walsaga.confirm_reservation(id text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    result text;
BEGIN
    UPDATE walsaga.reservation r
    SET status = CASE WHEN r.status = 'RESERVED' AND (r.expires_at IS NULL OR r.expires_at > now())
                      THEN 'CONFIRMED'
                      WHEN r.status = 'RESERVED' THEN 'EXPIRED'
                      ELSE r.status END,
        updated_at = now()
    WHERE r.id = confirm_reservation.id
    RETURNING r.status INTO result;
    RETURN result;
END
$$;

-- Release a reservation (compensation); idempotent. Returns true when it was
-- holding something.
CREATE FUNCTION walsaga.release_reservation(id text) RETURNS boolean
LANGUAGE sql AS $$
    WITH released AS (
        UPDATE walsaga.reservation r SET status = 'RELEASED', updated_at = now()
        WHERE r.id = release_reservation.id AND r.status IN ('RESERVED', 'CONFIRMED')
        RETURNING 1
    )
    SELECT count(*) > 0 FROM released
$$;

-- Mark reservations past their expiry; returns them, so the caller can
-- publish what expired in the same transaction.
CREATE FUNCTION walsaga.expire_reservations(max_rows int DEFAULT 1000)
RETURNS TABLE (id text, resource text, quantity numeric, saga_id text)
LANGUAGE sql AS $$
    UPDATE walsaga.reservation r SET status = 'EXPIRED', updated_at = now()
    WHERE r.id IN (
        SELECT e.id FROM walsaga.reservation e
        WHERE e.status = 'RESERVED' AND e.expires_at < now()
        ORDER BY e.expires_at
        LIMIT max_rows
        FOR UPDATE SKIP LOCKED
    )
    RETURNING r.id, r.resource, r.quantity, r.saga_id
$$;
