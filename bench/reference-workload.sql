-- Copied from the shared benchmark kit (shared/bench/reference-workload.sql) so tests and the
-- benchmark harness load the same data. psql variables: :days, :per_day.
-- Reference workload: "recompute 90 days of revenue after a pricing logic change".
-- :days days of orders, :per_day orders per day, starting 2024-01-01.
DROP SCHEMA IF EXISTS staging CASCADE; DROP SCHEMA IF EXISTS analytics CASCADE;
CREATE SCHEMA staging; CREATE SCHEMA analytics;
CREATE TABLE staging.orders (
  order_id bigint PRIMARY KEY, order_date date NOT NULL, customer_id int NOT NULL,
  sku int NOT NULL, quantity int NOT NULL, unit_price numeric(12,2) NOT NULL,
  discount numeric(5,4) NOT NULL, updated_at timestamptz NOT NULL DEFAULT now());
INSERT INTO staging.orders
SELECT g, DATE '2024-01-01' + ((g - 1) / :per_day)::int, ((g * 7919) % 50000)::int, ((g * 104729) % 2000)::int,
       (1 + (g % 5))::int, 5 + ((g * 31) % 9500) / 100.0, ((g * 13) % 30) / 100.0, now()
FROM generate_series(1::bigint, :days::bigint * :per_day) g;
CREATE INDEX ON staging.orders (order_date);
-- production table, computed with the OLD (buggy) pricing: discount ignored
CREATE TABLE analytics.fact_orders (
  order_id bigint PRIMARY KEY, order_date date NOT NULL, customer_id int NOT NULL,
  sku int NOT NULL, quantity int NOT NULL, revenue numeric(14,2) NOT NULL,
  updated_at timestamptz NOT NULL DEFAULT now());
INSERT INTO analytics.fact_orders
SELECT order_id, order_date, customer_id, sku, quantity, round(quantity * unit_price, 2), now() FROM staging.orders;
CREATE INDEX ON analytics.fact_orders (order_date);
ANALYZE;
