-- Sample partner database for the docker-compose trial (docker-compose.yml).
--
-- The postgres image runs this once, as the superuser, in the database
-- POSTGRES_DB, when its data volume is empty. It creates:
--   * partner tables whose names and columns differ from Cobi's (integer
--     keys, a `timestamp without time zone`, numeric amounts, an enum, a
--     text[] and an int[]), mapped by config/docker.toml;
--   * a little consistent sample data;
--   * the least-privilege role cobi-sync logs in as: LOGIN + REPLICATION and
--     SELECT on the mapped tables, nothing else (no ownership, no writes);
--   * the publication, created here by the tables' owner, because only an
--     owner may create a publication FOR TABLE. It lists exactly the tables
--     config/docker.toml maps (cobi-sync checks that, and creates the
--     replication slot itself).
--
-- Try live changes once it runs:
--   docker compose exec postgres psql -U postgres shop \
--     -c "UPDATE merchant SET trade_name = 'Renamed' WHERE id = 1"
--   curl -s localhost:8080/_mock/records/shops

\set ON_ERROR_STOP on

CREATE TYPE promo_kind AS ENUM ('percentage', 'fixed');

CREATE TABLE campus (
    id serial PRIMARY KEY,
    title text NOT NULL,
    cc text NOT NULL DEFAULT 'gb',
    modified_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE programme (
    id serial PRIMARY KEY,
    title text NOT NULL,
    modified_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE genre (
    id serial PRIMARY KEY,
    label text NOT NULL,
    modified_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE merchant (
    id serial PRIMARY KEY,
    trade_name text NOT NULL,
    country text NOT NULL,
    listed bool NOT NULL DEFAULT true,
    archived_at timestamptz,
    opened timestamp NOT NULL DEFAULT localtimestamp,
    modified_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE member (
    id serial PRIMARY KEY,
    uid uuid NOT NULL DEFAULT gen_random_uuid(),
    dob date,
    campus_id int REFERENCES campus,
    programme_id int REFERENCES programme,
    country text NOT NULL,
    sex char(1),
    modified_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE outlet (
    id serial PRIMARY KEY,
    merchant_id int NOT NULL REFERENCES merchant,
    label text NOT NULL,
    country text NOT NULL,
    lat numeric(9,6),
    lng float8,
    modified_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE promo (
    id serial PRIMARY KEY,
    merchant_id int NOT NULL REFERENCES merchant,
    title text NOT NULL,
    kind promo_kind NOT NULL,
    amount numeric(12,2) NOT NULL,
    country text NOT NULL,
    days text[],
    outlet_ids int[],
    valid_from timestamptz,
    enabled bool NOT NULL DEFAULT true,
    modified_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE merchant_genre (
    id serial PRIMARY KEY,
    merchant_id int NOT NULL REFERENCES merchant,
    genre_id int NOT NULL REFERENCES genre,
    country text NOT NULL,
    modified_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE purchase (
    id serial PRIMARY KEY,
    member_id int REFERENCES member,
    merchant_id int NOT NULL REFERENCES merchant,
    promo_id int REFERENCES promo,
    outlet_id int REFERENCES outlet,
    country text NOT NULL,
    channel text,
    saved numeric(12,2) NOT NULL DEFAULT 0,
    total numeric(12,2) NOT NULL,
    modified_at timestamptz NOT NULL DEFAULT now()
);
-- Not mapped: cobi-sync can neither read it nor see its changes.
CREATE TABLE internal_notes (id serial PRIMARY KEY, body text);

-- Sample data: 3 campuses, programmes and genres; 12 shops with an outlet,
-- a promo and a genre each; 12 members; 24 purchases.
INSERT INTO campus (title, cc)
    SELECT 'Campus ' || g, (ARRAY['gb', 'us', 'ca'])[1 + g % 3] FROM generate_series(1, 3) g;
INSERT INTO programme (title) SELECT 'Programme ' || g FROM generate_series(1, 3) g;
INSERT INTO genre (label) SELECT 'Genre ' || g FROM generate_series(1, 3) g;
INSERT INTO merchant (trade_name, country, listed)
    SELECT 'Shop ' || g, (ARRAY['gb', 'us', 'ca'])[1 + g % 3], g % 5 <> 0 FROM generate_series(1, 12) g;
INSERT INTO member (dob, campus_id, programme_id, country, sex)
    SELECT DATE '2000-01-01' + g * 40, 1 + g % 3, CASE WHEN g % 4 = 0 THEN NULL ELSE 1 + g % 3 END,
           'gb', (ARRAY['M', 'F', NULL])[1 + g % 3]
    FROM generate_series(1, 12) g;
INSERT INTO outlet (merchant_id, label, country, lat, lng)
    SELECT g, 'Outlet ' || g, 'gb', 51.5 + g / 1000.0, -0.12 FROM generate_series(1, 12) g;
INSERT INTO promo (merchant_id, title, kind, amount, country, days, outlet_ids, valid_from)
    SELECT g, 'Promo ' || g, (ARRAY['percentage', 'fixed'])[1 + g % 2]::promo_kind, 5 + g, 'gb',
           ARRAY['monday', 'friday'], ARRAY[g], now() - interval '1 day'
    FROM generate_series(1, 12) g;
INSERT INTO merchant_genre (merchant_id, genre_id, country)
    SELECT g, 1 + g % 3, 'gb' FROM generate_series(1, 12) g;
INSERT INTO purchase (member_id, merchant_id, promo_id, outlet_id, country, channel, saved, total)
    SELECT 1 + g % 12, 1 + g % 12, 1 + g % 12, 1 + g % 12, 'gb',
           (ARRAY['online', 'in-store'])[1 + g % 2], g % 3, 10 + g
    FROM generate_series(1, 24) g;

-- The role cobi-sync connects as (its password is PGPASSWORD in
-- docker-compose.yml). REPLICATION lets it create its slot and stream.
CREATE ROLE cobi_sync LOGIN REPLICATION PASSWORD 'cobi-sync-demo';
GRANT USAGE ON SCHEMA public TO cobi_sync;
GRANT SELECT ON campus, programme, genre, merchant, member, outlet, promo, merchant_genre, purchase
    TO cobi_sync;

CREATE PUBLICATION cobi_sync
    FOR TABLE campus, programme, genre, merchant, member, outlet, promo, merchant_genre, purchase
    WITH (publish_via_partition_root = true);
