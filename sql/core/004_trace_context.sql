-- walsaga core schema, version 4: trace context from the transaction.
--
-- A transaction that sets walsaga.traceparent (and walsaga.tracestate), e.g.
--   SELECT set_config('walsaga.traceparent', '00-<trace>-<span>-01', true);
-- has its events carry them as headers: capture triggers (redeployed with
-- `walsaga deploy`) and these two functions read the settings. Headers given
-- explicitly win. A participant handling a traced message also sets
-- walsaga.causation_id, the id of that message.

CREATE OR REPLACE FUNCTION walsaga.trace_headers() RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE
BEGIN ATOMIC
    SELECT CASE WHEN pg_catalog.current_setting('walsaga.traceparent', true) > ''
        THEN pg_catalog.jsonb_strip_nulls(pg_catalog.jsonb_build_object(
            'traceparent', pg_catalog.current_setting('walsaga.traceparent', true),
            'tracestate', NULLIF(pg_catalog.current_setting('walsaga.tracestate', true), ''),
            'causation_id', NULLIF(pg_catalog.current_setting('walsaga.causation_id', true), '')))
        ELSE '{}'::jsonb END;
END;

CREATE OR REPLACE FUNCTION walsaga.publish(
    aggregatetype text,
    aggregateid   text,
    type          text,
    payload       jsonb,
    headers       jsonb DEFAULT '{}'::jsonb
) RETURNS uuid
LANGUAGE sql
AS $$
    INSERT INTO walsaga.outbox (aggregatetype, aggregateid, type, payload, headers)
    VALUES ($1, $2, $3, coalesce($4, '{}'::jsonb),
            walsaga.trace_headers() || coalesce($5, '{}'::jsonb))
    RETURNING id
$$;

CREATE OR REPLACE FUNCTION walsaga.emit(
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
            'headers', walsaga.trace_headers() || coalesce(headers, '{}'::jsonb)
        )::text
    );
    RETURN event_id;
END
$$;
