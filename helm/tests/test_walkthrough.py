"""The compose walkthrough and the chart's settings, without Docker or a cluster: deploy/mini_challenge.sql seeds a real PostgreSQL
database with the data `backfill demo` builds, then the real `backfill` coordinator and two `backfill-worker` processes run
examples/mini_challenge.toml twice, each on its own database: once with the environment
deploy/compose.yaml gives them, once with the environment the chart renders for its worker
Deployment, coordinator Job and serve Deployment (services pointed at the local RabbitMQ,
Redis and PostgreSQL). Workers must become ready by the image's healthcheck, each run must
publish exactly the expected table, the coordinator's compose healthcheck command must pass,
`backfill serve` must answer its probes and list the run, and workers must stop cleanly on
SIGTERM.

Needs the binaries (scripts/test.sh builds them before it runs these tests; elsewhere set
BACKFILL_BIN_DIR) and the services scripts/test.sh starts; BACKFILL_TEST_PG_URL,
BACKFILL_TEST_BROKER_URL and BACKFILL_TEST_REDIS_URL point elsewhere, as for the Rust tests."""

import base64
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pika
import pytest
import yaml

from conftest import MINI_CHALLENGE_SPEC, REPO, Chart, env_of

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


def chart_environment(rendered, component, tmp_path):
    """The environment the chart gives a component's container, resolved as the kubelet would
    (ConfigMap, Secret keys, field refs), with the signing key file written under tmp_path."""
    workload = next(w for w in rendered.workloads() if w["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == component)
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    config = {c["metadata"]["name"]: c["data"] for c in rendered.all("ConfigMap")}
    secret = {k: base64.b64decode(v).decode() for k, v in rendered.one("Secret")["data"].items()}
    environment = {}
    for source in container.get("envFrom", []):
        environment.update(config[source["configMapRef"]["name"]])
    for name, variable in env_of(container).items():
        if "value" in variable:
            environment[name] = variable["value"]
        elif "secretKeyRef" in variable["valueFrom"]:
            environment[name] = secret[variable["valueFrom"]["secretKeyRef"]["key"]]
        else:
            environment[name] = f"{component}-pod-{uuid.uuid4().hex[:6]}"
    # the Secret volume's file, at a path this machine has
    (volume,) = [v for v in workload["spec"]["template"]["spec"]["volumes"] if v["name"] == "hmac-key"]
    (item,) = volume["secret"]["items"]
    key_file = tmp_path / f"{component}-{item['path']}"
    key_file.write_text(secret[item["key"]])
    assert environment["BACKFILL_HMAC_KEY_FILE"] == f"/etc/backfill/hmac/{item['path']}"
    environment["BACKFILL_HMAC_KEY_FILE"] = str(key_file)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("BACKFILL_", "OTEL_"))}
    return container, {**base, **environment}


def listen_locally(environment, variable):
    """The chart listens on 0.0.0.0:<port>; here, a free loopback port."""
    port = free_port()
    assert environment[variable].startswith("0.0.0.0:")
    environment[variable] = f"127.0.0.1:{port}"
    return port


def get(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, ""
    except OSError:
        return None, ""


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


class Stack:
    """Processes of one distributed run, stopped and cleaned up (queues, Redis keys) at the end."""

    def __init__(self, prefix, tmp_path):
        self.prefix, self.tmp_path, self.processes = prefix, tmp_path, []

    def start(self, name, command, environment):
        log = open(self.tmp_path / f"{name}.log", "w")
        process = subprocess.Popen([str(c) for c in command], env=environment, stdout=subprocess.DEVNULL, stderr=log)
        self.processes.append((name, process))
        return process

    def logs(self):
        return "\n".join(f"--- {name}\n" + (self.tmp_path / f"{name}.log").read_text() for name, _ in self.processes)

    def wait_ready(self, port, name):
        """The image's HEALTHCHECK (and the chart's readiness probe): /readyz answers 200."""
        check = dict(os.environ, BACKFILL_WORKER_LISTEN=f"0.0.0.0:{port}")
        deadline = time.monotonic() + 60
        while subprocess.run(["bash", REPO / "deploy" / "healthcheck.sh"], env=check, stderr=subprocess.DEVNULL).returncode != 0:
            assert time.monotonic() < deadline, f"{name} never became ready\n{self.logs()}"
            time.sleep(0.5)
        assert get(port, "/livez")[0] == 200

    def stop(self):
        """SIGTERM to everything; returns the exit codes."""
        for _, process in self.processes:
            process.send_signal(signal.SIGTERM)
        return {name: process.wait(timeout=60) for name, process in self.processes}

    def clean(self):
        for _, process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        delete_topology(self.prefix, "demo")
        if shutil.which("redis-cli"):
            keys = subprocess.run(["redis-cli", "-u", REDIS_URL, "--scan", "--pattern", f"{self.prefix}:*"],
                                  capture_output=True, text=True).stdout.split()
            if keys:
                subprocess.run(["redis-cli", "-u", REDIS_URL, "DEL", *keys], capture_output=True)


def assert_fixed(warehouse):
    """Exactly the expected table, through the dashboard's view too."""
    for query in ("SELECT * FROM fact_order_items EXCEPT SELECT * FROM expected_order_items",
                  "SELECT * FROM expected_order_items EXCEPT SELECT * FROM fact_order_items"):
        assert psql(warehouse, "-c", f"SELECT count(*) FROM ({query}) AS difference").strip() == "0"
    view = psql(warehouse, "-c", "SELECT order_date, total_quantity, items FROM daily_quantity ORDER BY 1")
    expected = psql(warehouse, "-c", "SELECT order_date, sum(quantity), count(*) FROM expected_order_items GROUP BY 1 ORDER BY 1")
    assert view == expected and len(view.splitlines()) == 10


def test_compose_settings_run_the_mini_challenge_distributed(warehouse, tmp_path):
    stack = Stack(f"bfdeploy-{uuid.uuid4().hex[:10]}", tmp_path)
    worker_environment = compose_environment("worker", stack.prefix, warehouse)
    coordinator_environment = compose_environment("coordinator", stack.prefix, warehouse)
    try:
        for index in range(2):  # `--scale worker=2`
            port = free_port()
            stack.start(f"worker-{index}", [BIN_DIR / COMPOSE["worker"]["command"][0]],
                        dict(worker_environment, BACKFILL_WORKER_ID=f"{stack.prefix}-{index}",
                             BACKFILL_WORKER_LISTEN=f"127.0.0.1:{port}"))
            stack.wait_ready(port, f"worker-{index}")

        command = [BIN_DIR / COMPOSE["coordinator"]["command"][0], *COMPOSE["coordinator"]["command"][1:]]
        command[2] = REPO / "examples" / "mini_challenge.toml"  # what the volume mounts there
        run = subprocess.run(command, env=coordinator_environment, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0 and "published run" in run.stdout, f"{run.stdout}\n{run.stderr}\n{stack.logs()}"
        assert_fixed(warehouse)

        # the coordinator's compose healthcheck command, with the coordinator's settings
        healthcheck = COMPOSE["coordinator"]["healthcheck"]["test"][1:]
        status = subprocess.run([BIN_DIR / healthcheck[0], *healthcheck[1:]], env=coordinator_environment,
                                capture_output=True, text=True, timeout=60)
        assert status.returncode == 0 and "published" in status.stdout, status.stdout + status.stderr

        assert stack.stop() == {"worker-0": 0, "worker-1": 0}, "workers stop cleanly on SIGTERM"
    finally:
        stack.clean()


def test_chart_settings_run_the_mini_challenge_distributed(warehouse, tmp_path):
    stack = Stack(f"bfdeploy-{uuid.uuid4().hex[:10]}", tmp_path)
    chart = Chart()
    rendered = chart.render({
        "broker": {"url": BROKER_URL, "queuePrefix": stack.prefix},
        "redis": {"url": REDIS_URL},
        "warehouses": {"demo": {"url": warehouse}},
        "hmac": {"key": "chart-walkthrough-signing-key"},
        "serve": {"enabled": True},
        "backfills": [{"name": "fix-doubled-quantity", "spec": MINI_CHALLENGE_SPEC}],
    })
    chart.close()
    try:
        # the worker Deployment's container, alone: nothing else would run the partitions
        container, environment = chart_environment(rendered, "worker", tmp_path)
        port = listen_locally(environment, "BACKFILL_WORKER_LISTEN")
        stack.start("worker", [BIN_DIR / container["command"][0], *container.get("args", [])], environment)
        stack.wait_ready(port, "worker")

        # the coordinator Job's container, with its ConfigMap's spec where the volume mounts it
        container, environment = chart_environment(rendered, "coordinator", tmp_path)
        spec = tmp_path / "spec.toml"
        spec.write_text(rendered.one("ConfigMap", "-spec")["data"]["spec.toml"])
        arguments = [str(spec) if a == "/etc/backfill/spec/spec.toml" else a for a in container["args"]]
        run = subprocess.run([BIN_DIR / container["command"][0], *arguments], env=environment,
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0 and "published run" in run.stdout, f"{run.stdout}\n{run.stderr}\n{stack.logs()}"
        assert_fixed(warehouse)

        # `backfill serve` as the chart runs it: probes, the run in /api/runs, metrics
        container, environment = chart_environment(rendered, "serve", tmp_path)
        port = listen_locally(environment, "BACKFILL_SERVE_LISTEN")
        stack.start("serve", [BIN_DIR / container["command"][0], *container["args"]], environment)
        deadline = time.monotonic() + 60
        while get(port, "/readyz")[0] != 200:
            assert time.monotonic() < deadline, f"serve never became ready\n{stack.logs()}"
            time.sleep(0.5)
        assert get(port, "/livez")[0] == 200
        status, runs = get(port, "/api/runs")
        assert status == 200 and [run["state"] for run in json.loads(runs)] == ["published"], runs
        status, metrics = get(port, "/metrics")
        assert status == 200 and "backfill_" in metrics

        codes = stack.stop()
        assert codes["worker"] == 0, "the worker stops cleanly on SIGTERM"
    finally:
        stack.clean()
