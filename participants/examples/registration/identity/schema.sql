-- The identity service, as a legacy service would have it: one table and two
-- procedures, no application code. The provider's user id is all it keeps.
-- The calls to the identity provider are effects: the procedures request
-- them (walsaga.request_effect), `walsaga effects` performs them and its
-- on_done statements (effects.toml) write this table.

CREATE TABLE provider_users (
    registration_id  text        PRIMARY KEY,
    provider_user_id text        NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now()
);

-- Create the user at the provider: one effect per registration, keyed by the
-- saga command's idempotency key (<saga>/create-user/do).
CREATE PROCEDURE create_user(
    p_registration text, p_email text, p_name text,
    p_key text, p_saga text, p_saga_type text
)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM walsaga.request_effect(
        'create_user',
        p_key,
        jsonb_build_object('registration_id', p_registration, 'email', p_email, 'name', p_name),
        jsonb_build_object('saga_id', p_saga, 'saga_type', p_saga_type),
        p_registration);
END
$$;

-- The compensation: delete the user at the provider. Never refuses: when no
-- user was created, it answers at once.
CREATE PROCEDURE delete_user(p_registration text, p_key text, p_saga text, p_saga_type text)
LANGUAGE plpgsql AS $$
DECLARE
    v_user text;
    v_headers jsonb := jsonb_build_object('saga_id', p_saga, 'saga_type', p_saga_type);
BEGIN
    SELECT provider_user_id INTO v_user FROM provider_users
    WHERE registration_id = p_registration;
    IF v_user IS NULL THEN
        PERFORM walsaga.publish('identity', p_registration, 'UserDeleted',
            jsonb_build_object('registration_id', p_registration, 'result', NULL), v_headers);
    ELSE
        PERFORM walsaga.request_effect(
            'delete_user',
            p_key,
            jsonb_build_object('registration_id', p_registration, 'provider_user_id', v_user),
            v_headers,
            p_registration);
    END IF;
END
$$;
