-- The lesson's mini challenge on PostgreSQL, for the compose stack (run once by the postgres
-- image's /docker-entrypoint-initdb.d on an empty volume). The same data as
-- coordinator/src/demo.rs builds for `backfill demo` and the tests: 10 days from 2024-03-01,
-- 150 orders a day, 1 to 3 items per order; a bug doubled `quantity` on 2024-03-03..06.
--   fact_order_items      production, with the bug
--   staging_order_items   corrected rows, plus a stale buggy version of every 10th order on
--                         the bug days (dedupe must drop it); item (450, 1) was cancelled
--   expected_order_items  what production must hold after a correct backfill
--   daily_quantity        the dashboard view on top of production
-- examples/mini_challenge.toml fixes it; scripts/test-deploy.sh runs that spec on this file.
\set ON_ERROR_STOP on
BEGIN;
DROP VIEW IF EXISTS daily_quantity;
DROP TABLE IF EXISTS fact_order_items, staging_order_items, expected_order_items;

CREATE TEMPORARY TABLE mini_challenge_items ON COMMIT DROP AS
SELECT o.order_id,
       i.item_id,
       DATE '2024-03-01' + o.day AS order_date,
       o.day BETWEEN 2 AND 5 AS bug_day,
       'SKU-' || lpad(((o.order_id * 7 + i.item_id * 13) % 500)::text, 4, '0') AS sku,
       (1 + (o.order_id * 7 + i.item_id) % 5)::integer AS quantity,
       (2.5 + o.order_id % 40)::numeric(10,2) AS unit_price
FROM (SELECT day, day * 150 + n AS order_id
      FROM generate_series(0, 9) AS day, generate_series(1, 150) AS n) AS o
CROSS JOIN LATERAL generate_series(1, 1 + (o.order_id % 3)::integer) AS i(item_id);

CREATE TABLE fact_order_items (
    order_id bigint NOT NULL, item_id integer NOT NULL, order_date date NOT NULL,
    sku text NOT NULL, quantity integer NOT NULL, unit_price numeric(10,2) NOT NULL,
    updated_at timestamp NOT NULL, PRIMARY KEY (order_id, item_id));
CREATE TABLE staging_order_items (
    order_id bigint NOT NULL, item_id integer NOT NULL, order_date date NOT NULL,
    sku text NOT NULL, quantity integer NOT NULL, unit_price numeric(10,2) NOT NULL,
    updated_at timestamp NOT NULL);
CREATE TABLE expected_order_items (LIKE fact_order_items INCLUDING ALL);

INSERT INTO fact_order_items
SELECT order_id, item_id, order_date, sku,
       CASE WHEN bug_day THEN quantity * 2 ELSE quantity END,
       unit_price, order_date + TIME '08:00'
FROM mini_challenge_items;

INSERT INTO staging_order_items
SELECT order_id, item_id, order_date, sku, quantity * 2, unit_price, order_date + TIME '07:00'
FROM mini_challenge_items
WHERE bug_day AND order_id % 10 = 0 AND (order_id, item_id) <> (450, 1)
UNION ALL
SELECT order_id, item_id, order_date, sku, quantity, unit_price,
       CASE WHEN bug_day THEN TIMESTAMP '2024-03-20 09:00' ELSE order_date + TIME '08:00' END
FROM mini_challenge_items
WHERE (order_id, item_id) <> (450, 1);

INSERT INTO expected_order_items
SELECT order_id, item_id, order_date, sku, quantity, unit_price, updated_at
FROM staging_order_items
WHERE updated_at <> order_date + TIME '07:00';

CREATE INDEX fact_order_items_order_date ON fact_order_items (order_date);
CREATE INDEX staging_order_items_order_date ON staging_order_items (order_date);
CREATE VIEW daily_quantity AS
SELECT order_date, sum(quantity) AS total_quantity, count(*) AS items
FROM fact_order_items GROUP BY order_date;
COMMIT;
