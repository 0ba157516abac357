-- The hotel service: a legacy service in plain SQL. It knows nothing of
-- sagas, Kafka or walsaga; it joins the trip saga through capture.toml (its
-- writes become events) and handlers.toml (commands become calls of these
-- procedures).

CREATE TABLE hotels (
    id    text PRIMARY KEY,
    name  text NOT NULL,
    rooms int  NOT NULL CHECK (rooms >= 0)   -- rooms to sell each night
);

-- One booking per trip. A HELD booking is a short-term, timeout-based lock
-- on rooms: it lasts until confirmed, cancelled, or its hold runs out.
CREATE TABLE room_bookings (
    trip_id    text        PRIMARY KEY,
    hotel_id   text        NOT NULL,
    check_in   date        NOT NULL,
    check_out  date        NOT NULL CHECK (check_out > check_in),
    rooms      int         NOT NULL CHECK (rooms >= 0),
    status     text        NOT NULL CHECK (status IN
                   ('HELD', 'CONFIRMED', 'CANCELLED', 'EXPIRED', 'REFUSED')),
    reason     text,
    held_until timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX room_bookings_taken ON room_bookings (hotel_id, check_in)
    WHERE status IN ('HELD', 'CONFIRMED');
CREATE INDEX room_bookings_holds ON room_bookings (held_until)
    WHERE status = 'HELD';

-- Rooms of a hotel taken (held or confirmed) on one night.
CREATE FUNCTION rooms_taken(p_hotel text, p_night date) RETURNS int
LANGUAGE sql STABLE AS $$
    SELECT coalesce(sum(rooms), 0)::int FROM room_bookings
    WHERE hotel_id = p_hotel AND status IN ('HELD', 'CONFIRMED')
      AND check_in <= p_night AND p_night < check_out
$$;

-- Hold rooms for every night of a stay, or record why not. Locks the hotel
-- row, so concurrent trips cannot sell the same last room. An unknown hotel
-- is a business error (SQLSTATE WS101).
CREATE PROCEDURE hold_rooms(p_trip text, p_hotel text, p_check_in date, p_check_out date,
                            p_rooms int, p_hold_s numeric DEFAULT 900)
LANGUAGE plpgsql AS $$
DECLARE
    v_rooms int;
    v_night date;
BEGIN
    IF EXISTS (SELECT 1 FROM room_bookings WHERE trip_id = p_trip) THEN
        RETURN;  -- decided before
    END IF;
    SELECT rooms INTO v_rooms FROM hotels WHERE id = p_hotel FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown hotel %', p_hotel USING ERRCODE = 'WS101';
    END IF;
    SELECT g.n::date INTO v_night
    FROM generate_series(p_check_in::timestamp, (p_check_out - 1)::timestamp,
                         interval '1 day') AS g(n)
    WHERE rooms_taken(p_hotel, g.n::date) + p_rooms > v_rooms
    ORDER BY g.n LIMIT 1;
    IF FOUND THEN
        INSERT INTO room_bookings (trip_id, hotel_id, check_in, check_out, rooms, status, reason)
        VALUES (p_trip, p_hotel, p_check_in, p_check_out, p_rooms, 'REFUSED',
                format('no %s room(s) free on %s', p_rooms, v_night));
    ELSE
        INSERT INTO room_bookings (trip_id, hotel_id, check_in, check_out, rooms, status,
                                   held_until)
        VALUES (p_trip, p_hotel, p_check_in, p_check_out, p_rooms, 'HELD',
                now() + make_interval(secs => p_hold_s));
    END IF;
END
$$;

-- Make a hold a booking. Too late (the hold ran out, or was cancelled) is a
-- business error (WS102): the trip cannot have its rooms.
CREATE PROCEDURE confirm_rooms(p_trip text)
LANGUAGE plpgsql AS $$
DECLARE
    v_status text;
    v_until  timestamptz;
BEGIN
    SELECT status, held_until INTO v_status, v_until
    FROM room_bookings WHERE trip_id = p_trip FOR UPDATE;
    IF v_status = 'CONFIRMED' THEN
        RETURN;
    ELSIF v_status = 'HELD' AND v_until > now() THEN
        UPDATE room_bookings SET status = 'CONFIRMED', held_until = NULL, updated_at = now()
        WHERE trip_id = p_trip;
    ELSE
        RAISE EXCEPTION 'trip % holds no rooms (%)', p_trip,
            CASE WHEN v_status = 'HELD' THEN 'hold ran out' ELSE coalesce(v_status, 'none') END
            USING ERRCODE = 'WS102';
    END IF;
END
$$;

-- Compensation: give the rooms back. Idempotent, and fine when nothing was
-- ever held (the trip may cancel a hold whose outcome it never learnt):
-- always leaves a CANCELLED row, so every cancellation is visible as an event.
CREATE PROCEDURE cancel_rooms(p_trip text, p_hotel text)
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE room_bookings SET status = 'CANCELLED', held_until = NULL, updated_at = now()
    WHERE trip_id = p_trip;
    IF NOT FOUND THEN
        INSERT INTO room_bookings (trip_id, hotel_id, check_in, check_out, rooms, status, reason)
        VALUES (p_trip, p_hotel, current_date, current_date + 1, 0, 'CANCELLED',
                'cancelled before any hold');
    END IF;
END
$$;

-- Holds not confirmed in time give their rooms back.
CREATE PROCEDURE expire_room_holds()
LANGUAGE sql AS $$
    UPDATE room_bookings SET status = 'EXPIRED', updated_at = now()
    WHERE trip_id IN (SELECT trip_id FROM room_bookings
                      WHERE status = 'HELD' AND held_until < now()
                      ORDER BY held_until LIMIT 1000 FOR UPDATE SKIP LOCKED);
$$;
