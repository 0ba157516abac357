-- Seats to sell, per flight. Rows already there are left alone.
INSERT INTO flights (id, origin, destination, seats) VALUES
    ('LIS-BER', 'LIS', 'BER', 30),
    ('LIS-NYC', 'LIS', 'NYC', 12),
    ('LIS-TYO', 'LIS', 'TYO', 4)
ON CONFLICT (id) DO NOTHING;
