-- walsaga core schema, version 2: time-ordered outbox ids.
--
-- Capture triggers insert an outbox row inside every captured write, so the
-- outbox's primary key is maintained on the legacy table's hot path. Random
-- (version 4) ids land on a random leaf of that index each time: after every
-- checkpoint nearly each insert writes a full-page image to the WAL, and the
-- whole index has to stay in cache. Version 7 ids (RFC 9562: 48-bit Unix
-- milliseconds, then random bits) keep inserts at the right edge of the
-- index. They are as unique as version 4 ids for deduplication (74 random
-- bits within each millisecond). Ids already stored keep their value.

-- BEGIN ATOMIC: the body is bound when created, not looked up through the
-- caller's search_path, and the planner still inlines it where it is used
-- as a column default (no function call per row).
CREATE FUNCTION walsaga.uuid_v7() RETURNS uuid
LANGUAGE sql VOLATILE PARALLEL SAFE
BEGIN ATOMIC
    SELECT encode(
        set_bit(set_bit(
            overlay(uuid_send(gen_random_uuid())
                    placing substring(int8send((date_part('epoch', clock_timestamp()) * 1000)::bigint) from 3)
                    from 1 for 6),
            52, 1), 53, 1),  -- the version nibble: 0100 (4) becomes 0111 (7)
        'hex')::uuid;
END;

ALTER TABLE walsaga.outbox ALTER COLUMN id SET DEFAULT walsaga.uuid_v7();
