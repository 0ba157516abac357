#!/bin/sh
# Sample inventory for the travel example. Each file here is named after the
# database it goes into: flight.sql goes into database `flight` on host
# `flight-db`. Run once the tables exist; idempotent (rows already there are
# left alone). User and password come from PGUSER and PGPASSWORD.
set -eu
cd "$(dirname "$0")"
for file in *.sql; do
    db="${file%.sql}"
    echo "travel-inventory: $file -> $db-db/$db"
    psql --no-psqlrc --quiet -v ON_ERROR_STOP=1 --single-transaction \
        -h "$db-db" -d "$db" -f "$file"
done
