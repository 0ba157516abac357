-- Cars to rent, per station and class. Rows already there are left alone.
INSERT INTO car_classes (id, station, cars) VALUES
    ('BER-compact', 'BER', 20),
    ('NYC-suv',     'NYC', 5),
    ('TYO-kei',     'TYO', 2)
ON CONFLICT (id) DO NOTHING;
