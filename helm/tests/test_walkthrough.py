"""The compose walkthrough, without Docker: deploy/mini_challenge.sql seeds a real PostgreSQL
database with the data `backfill demo` builds, then the real `backfill` coordinator and two `backfill-worker` processes run
examples/mini_challenge.toml with the environment deploy/compose.yaml gives them (hosts
pointed at the local RabbitMQ, Redis and PostgreSQL). The run must publish exactly the
expected table, the coordinator's compose healthcheck command must pass, and the workers must
stop cleanly on SIGTERM.

Needs the binaries (scripts/test.sh builds them before it runs these tests; elsewhere set
BACKFILL_BIN_DIR) and the services scripts/test.sh starts; BACKFILL_TEST_PG_URL,
BACKFILL_TEST_BROKER_URL and BACKFILL_TEST_REDIS_URL point elsewhere, as for the Rust tests."""

import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pika
import pytest
import yaml

from conftest import REPO

BIN_DIR = Path(os.environ.get("BACKFILL_BIN_DIR", REPO / "target" / "debug"))
PG_ADMIN_URL = os.environ.get("BACKFILL_TEST_PG_URL", "postgres://postgres@127.0.0.1:5432/postgres")
BROKER_URL = os.environ.get("BACKFILL_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
REDIS_URL = os.environ.get("BACKFILL_TEST_REDIS_URL", "redis://127.0.0.1:6379")
COMPOSE = yaml.safe_load((REPO / "deploy" / "compose.yaml").read_text())["services"]

if not (BIN_DIR / "backfill").is_file() or not (BIN_DIR / "backfill-worker").is_file():
    if os.environ.get("CI"):
        raise RuntimeError(f"no backfill binaries in {BIN_DIR}: scripts/test.sh builds them before these tests")
    pytest.skip(f"no backfill binaries in {BIN_DIR} (run `cargo build` or set BACKFILL_BIN_DIR)", allow_module_level=True)


def psql(url, *args):
    return subprocess.run(["psql", "--no-psqlrc", "-v", "ON_ERROR_STOP=1", "-qAt", url, *args],
                          check=True, capture_output=True, text=True, timeout=120).stdout


def with_database(url, name):
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture
def warehouse():
    """A fresh database holding the mini challenge as deploy/mini_challenge.sql seeds it."""
    name = f"bf_deploy_{uuid.uuid4().hex[:12]}"
    psql(PG_ADMIN_URL, "-c", f"CREATE DATABASE {name}")
    url = with_database(PG_ADMIN_URL, name)
    try:
        psql(url, "-f", str(REPO / "deploy" / "mini_challenge.sql"))
        yield url
    finally:
        psql(PG_ADMIN_URL, "-c", f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def compose_environment(service, prefix, warehouse_url):
    """A compose service's environment, its hosts replaced by the local services."""
    environment = dict(COMPOSE[service]["environment"])
    replacements = {
        "BACKFILL_BROKER_URL": BROKER_URL,
        "BACKFILL_REDIS_URL": REDIS_URL,
        "BACKFILL_WAREHOUSE_DEMO_URL": warehouse_url,
        "BACKFILL_QUEUE_PREFIX": prefix,
    }
    assert set(replacements) <= set(environment), "compose.yaml no longer sets what this test replaces"
    environment.update(replacements)
    # ${BACKFILL_HMAC_KEY:-default}: what compose uses when the variable is not exported
    environment["BACKFILL_HMAC_KEY"] = re.fullmatch(r"\$\{BACKFILL_HMAC_KEY:-(.+)\}", environment["BACKFILL_HMAC_KEY"]).group(1)
    # no Jaeger here
    environment = {k: v for k, v in environment.items() if not k.startswith("OTEL_")}
    base = {k: v for k, v in os.environ.items() if not k.startswith(("BACKFILL_", "OTEL_"))}
    return {**base, **environment, "BACKFILL_LOG": "info"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def delete_topology(prefix, warehouse):
    """What common/src/broker.rs declares under a prefix, as the Rust tests' Cluster removes it."""
    try:
        connection = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
    except pika.exceptions.AMQPError:
        return
    channel = connection.channel()
    for queue in (f"{prefix}.tasks.{warehouse}", f"{prefix}.dead.{warehouse}"):
        channel.queue_delete(queue)
    for exchange in (f"{prefix}.tasks", f"{prefix}.dead"):
        channel.exchange_delete(exchange)
    connection.close()


def worker_serves_http():
    help_text = subprocess.run([BIN_DIR / "backfill-worker", "--help"], capture_output=True, text=True, check=True).stdout
    return "BACKFILL_WORKER_LISTEN" in help_text


def test_the_coordinator_arguments_of_compose_and_the_chart_parse():
    # a usage error exits 2 before anything is read; a missing spec file is an error (1)
    for arguments in (COMPOSE["coordinator"]["command"][1:], ["run", "/etc/backfill/spec/spec.toml", "--no-progress", "--owner", "helm:bf/x"]):
        result = subprocess.run([BIN_DIR / "backfill", *arguments], capture_output=True, text=True, timeout=30,
                                env={k: v for k, v in os.environ.items() if not k.startswith("BACKFILL_")})
        assert result.returncode == 1, result.stderr
        assert "reading spec" in result.stderr, result.stderr


def rows(fetch, table):
    """A table's rows as text, in a form both databases print alike."""
    query = f"SELECT order_id, item_id, order_date, sku, quantity, unit_price, updated_at FROM {table}"
    return sorted("|".join([*map(str, row[:5]), "%.2f" % float(row[5]), str(row[6])]) for row in fetch(query))


def test_the_seed_holds_the_data_backfill_demo_builds(warehouse, tmp_path):
    # `backfill demo` seeds the same data into SQLite (coordinator/src/demo.rs) and fixes it:
    # its archive keeps the production table, staging and expected stay as seeded.
    demo = subprocess.run([BIN_DIR / "backfill", "demo", "--dir", tmp_path], capture_output=True, text=True, timeout=300)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    sqlite = sqlite3.connect(tmp_path / "warehouse.db")
    (archive,) = [name for (name,) in sqlite.execute("SELECT name FROM sqlite_master WHERE name LIKE 'fact_order_items__bf_archive_%'")]

    def from_postgres(query):
        return [line.split("|") for line in psql(warehouse, "-c", query).splitlines()]

    def from_sqlite(query):
        return sqlite.execute(query).fetchall()

    for seeded, demo_table in [("fact_order_items", archive), ("staging_order_items", "staging_order_items"),
                               ("expected_order_items", "expected_order_items")]:
        expected = rows(from_sqlite, demo_table)
        assert len(expected) > 2900
        assert rows(from_postgres, seeded) == expected, seeded


def test_mini_challenge_runs_distributed_with_the_compose_settings(warehouse, tmp_path):
    prefix = f"bfdeploy-{uuid.uuid4().hex[:10]}"
    worker_environment = compose_environment("worker", prefix, warehouse)
    coordinator_environment = compose_environment("coordinator", prefix, warehouse)
    serves_http = worker_serves_http()
    workers, ports = [], []
    try:
        for index in range(2):
            environment = dict(worker_environment, BACKFILL_WORKER_ID=f"{prefix}-{index}")
            ports.append(free_port())
            environment["BACKFILL_WORKER_LISTEN"] = f"127.0.0.1:{ports[-1]}"
            log = open(tmp_path / f"worker-{index}.log", "w")
            workers.append(subprocess.Popen([BIN_DIR / COMPOSE["worker"]["command"][0]], env=environment,
                                            stdout=subprocess.DEVNULL, stderr=log))
        if serves_http:
            # the image's HEALTHCHECK, against the real worker: ready once consuming
            deadline = time.monotonic() + 60
            for port in ports:
                check = dict(os.environ, BACKFILL_WORKER_LISTEN=f"0.0.0.0:{port}")
                while subprocess.run(["bash", REPO / "deploy" / "healthcheck.sh"], env=check, stderr=subprocess.DEVNULL).returncode != 0:
                    assert time.monotonic() < deadline, "a worker never became ready"
                    time.sleep(0.5)

        command = list(COMPOSE["coordinator"]["command"])
        command[0] = BIN_DIR / command[0]
        command[2] = REPO / "examples" / "mini_challenge.toml"
        run = subprocess.run(command, env=coordinator_environment, capture_output=True, text=True, timeout=300)
        logs = "\n".join((tmp_path / f"worker-{i}.log").read_text() for i in range(2))
        assert run.returncode == 0, f"{run.stdout}\n{run.stderr}\n{logs}"
        assert "published run" in run.stdout

        # exactly the expected table, through the dashboard's view too
        for query in ("SELECT * FROM fact_order_items EXCEPT SELECT * FROM expected_order_items",
                      "SELECT * FROM expected_order_items EXCEPT SELECT * FROM fact_order_items"):
            assert psql(warehouse, "-c", f"SELECT count(*) FROM ({query}) AS difference").strip() == "0"
        view = psql(warehouse, "-c", "SELECT order_date, total_quantity, items FROM daily_quantity ORDER BY 1")
        expected = psql(warehouse, "-c", "SELECT order_date, sum(quantity), count(*) FROM expected_order_items GROUP BY 1 ORDER BY 1")
        assert view == expected and len(view.splitlines()) == 10

        # the coordinator's compose healthcheck command, with the coordinator's settings
        healthcheck = COMPOSE["coordinator"]["healthcheck"]["test"][1:]
        status = subprocess.run([BIN_DIR / healthcheck[0], *healthcheck[1:]], env=coordinator_environment,
                                capture_output=True, text=True, timeout=60)
        assert status.returncode == 0 and "published" in status.stdout, status.stdout + status.stderr

        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        for worker in workers:
            assert worker.wait(timeout=60) == 0, "a worker did not stop cleanly on SIGTERM"
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
        delete_topology(prefix, "demo")
        if shutil.which("redis-cli"):
            keys = subprocess.run(["redis-cli", "-u", REDIS_URL, "--scan", "--pattern", f"{prefix}:*"],
                                  capture_output=True, text=True).stdout.split()
            if keys:
                subprocess.run(["redis-cli", "-u", REDIS_URL, "DEL", *keys], capture_output=True)
