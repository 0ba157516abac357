-- walsaga core schema, version 5: walsaga.publish keeps its plan.
--
-- A LANGUAGE sql function whose body writes cannot be inlined, and Postgres
-- parses and plans its INSERT again on every call. PL/pgSQL plans it once per
-- session and reuses the plan: a call now costs the server about what the
-- INSERT written out costs (bench/publish_bench.py on a 2-core machine: 126 µs
-- of backend CPU per call instead of 226, the INSERT alone 116). Same
-- arguments, same result, same row.

CREATE OR REPLACE FUNCTION walsaga.publish(
    aggregatetype text,
    aggregateid   text,
    type          text,
    payload       jsonb,
    headers       jsonb DEFAULT '{}'::jsonb
) RETURNS uuid
LANGUAGE plpgsql
AS $$
DECLARE
    event_id uuid;
BEGIN
    INSERT INTO walsaga.outbox (aggregatetype, aggregateid, type, payload, headers)
    VALUES ($1, $2, $3, coalesce($4, '{}'::jsonb),
            walsaga.trace_headers() || coalesce($5, '{}'::jsonb))
    RETURNING walsaga.outbox.id INTO event_id;
    RETURN event_id;
END
$$;
