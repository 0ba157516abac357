-- The customer service: a legacy service in plain SQL. It knows nothing of
-- sagas, Kafka or walsaga; it joins the order sagas through capture.toml
-- (its writes become events) and handlers.toml (events and commands become
-- calls of these procedures).

CREATE TABLE customers (
    id           text          PRIMARY KEY,
    name         text          NOT NULL,
    credit_limit numeric(12,2) NOT NULL CHECK (credit_limit >= 0)
);

-- A reservation is a short-term, timeout-based lock on credit: it holds
-- until confirmed, released, or expired.
CREATE TABLE credit_reservations (
    order_id    text          PRIMARY KEY,
    customer_id text          NOT NULL,
    amount      numeric(12,2) NOT NULL,
    status      text          NOT NULL CHECK (status IN
                    ('RESERVED', 'CONFIRMED', 'RELEASED', 'EXPIRED', 'REJECTED')),
    reason      text,
    expires_at  timestamptz,
    created_at  timestamptz   NOT NULL DEFAULT now(),
    updated_at  timestamptz   NOT NULL DEFAULT now()
);
CREATE INDEX credit_reservations_held ON credit_reservations (customer_id)
    WHERE status IN ('RESERVED', 'CONFIRMED');
CREATE INDEX credit_reservations_expiry ON credit_reservations (expires_at)
    WHERE status = 'RESERVED';

-- Reserve credit for an order, or record why not. Locks the customer row so
-- that concurrent orders cannot over-commit the limit. An unknown customer is
-- a business error (SQLSTATE WS002).
CREATE PROCEDURE reserve_credit(p_customer text, p_order text, p_amount numeric,
                                p_hold interval DEFAULT interval '30 seconds')
LANGUAGE plpgsql AS $$
DECLARE
    v_limit numeric;
    v_held  numeric;
BEGIN
    IF EXISTS (SELECT 1 FROM credit_reservations WHERE order_id = p_order) THEN
        RETURN;  -- decided before
    END IF;
    SELECT credit_limit INTO v_limit FROM customers WHERE id = p_customer FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown customer %', p_customer USING ERRCODE = 'WS002';
    END IF;
    SELECT coalesce(sum(amount), 0) INTO v_held FROM credit_reservations
    WHERE customer_id = p_customer AND status IN ('RESERVED', 'CONFIRMED');
    IF v_held + p_amount > v_limit THEN
        INSERT INTO credit_reservations (order_id, customer_id, amount, status, reason)
        VALUES (p_order, p_customer, p_amount, 'REJECTED',
                format('credit limit exceeded: %s held of %s', v_held, v_limit));
    ELSE
        INSERT INTO credit_reservations (order_id, customer_id, amount, status, expires_at)
        VALUES (p_order, p_customer, p_amount, 'RESERVED', now() + p_hold);
    END IF;
END
$$;

-- Make a reservation permanent. Too late (expired or released) is a business
-- error (WS003), so the saga can undo the order.
CREATE PROCEDURE confirm_credit(p_order text)
LANGUAGE plpgsql AS $$
DECLARE
    v_status text;
BEGIN
    SELECT status INTO v_status FROM credit_reservations WHERE order_id = p_order FOR UPDATE;
    IF v_status = 'CONFIRMED' THEN
        RETURN;
    ELSIF v_status = 'RESERVED' THEN
        UPDATE credit_reservations SET status = 'CONFIRMED', expires_at = NULL, updated_at = now()
        WHERE order_id = p_order;
    ELSE
        RAISE EXCEPTION 'no credit reserved for order % (%)', p_order, coalesce(v_status, 'none')
            USING ERRCODE = 'WS003';
    END IF;
END
$$;

-- Compensation: give the credit back. Idempotent, and fine when nothing was
-- ever reserved (the saga may compensate a command whose outcome it never
-- learnt); always leaves a RELEASED row so the release is visible as an event.
CREATE PROCEDURE release_credit(p_order text, p_customer text DEFAULT NULL)
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE credit_reservations SET status = 'RELEASED', updated_at = now()
    WHERE order_id = p_order AND status IN ('RESERVED', 'CONFIRMED', 'REJECTED', 'EXPIRED');
    IF NOT FOUND AND NOT EXISTS (SELECT 1 FROM credit_reservations WHERE order_id = p_order) THEN
        INSERT INTO credit_reservations (order_id, customer_id, amount, status, reason)
        VALUES (p_order, coalesce(p_customer, ''), 0, 'RELEASED', 'released before any reservation');
    END IF;
END
$$;

-- Holds not confirmed in time go back to the customer.
CREATE PROCEDURE expire_credit_reservations()
LANGUAGE sql AS $$
    UPDATE credit_reservations SET status = 'EXPIRED', updated_at = now()
    WHERE order_id IN (SELECT order_id FROM credit_reservations
                       WHERE status = 'RESERVED' AND expires_at < now()
                       ORDER BY expires_at LIMIT 1000 FOR UPDATE SKIP LOCKED);
$$;
