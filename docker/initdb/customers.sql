-- The customer service's customers, loaded once when its database is created
-- (after its schema.sql). Credit limits as in `walsaga demo`.
INSERT INTO customers (id, name, credit_limit) VALUES
    ('alice', 'Alice', 500.00),
    ('bob',   'Bob',   250.00),
    ('carol', 'Carol', 1000.00),
    ('dave',  'Dave',  120.00),
    ('erin',  'Erin',  800.00)
ON CONFLICT (id) DO NOTHING;
