-- Rooms to sell each night, per hotel. Rows already there are left alone.
INSERT INTO hotels (id, name, rooms) VALUES
    ('berlin-mitte', 'Berlin Mitte', 25),
    ('nyc-soho',     'NYC SoHo',     6),
    ('tokyo-ginza',  'Tokyo Ginza',  2)
ON CONFLICT (id) DO NOTHING;
