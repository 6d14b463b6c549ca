"""deploy/compose.yaml and deploy/Dockerfile, checked without a Docker engine: the compose file
parses and uses only official images or ours, binds to 127.0.0.1, has healthchecks and scales
its workers; the Dockerfile builds what CI builds; the image's healthcheck script works."""

import http.server
import os
import re
import shlex
import socket
import subprocess
import sys
import threading

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import pytest
import yaml

from conftest import REPO

DEPLOY = REPO / "deploy"
COMPOSE = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]
# Docker Hub's official images (library/...) and Jaeger's own.
OFFICIAL_IMAGES = {"postgres", "rabbitmq", "redis", "jaegertracing/all-in-one"}
DOCKERFILE = (DEPLOY / "Dockerfile").read_text()


def built_from_our_dockerfile(service):
    build = service.get("build")
    return isinstance(build, dict) and build.get("dockerfile") == "deploy/Dockerfile" and (DEPLOY / build["context"]).resolve() == REPO


def test_every_image_is_official_or_built_from_deploy_dockerfile():
    assert {"postgres", "rabbitmq", "redis", "jaeger", "coordinator", "worker"} <= set(SERVICES)
    for name, service in SERVICES.items():
        if built_from_our_dockerfile(service):
            continue
        image = service["image"]
        repository, _, tag = image.partition(":")
        assert repository in OFFICIAL_IMAGES, f"{name}: {image} is not an official image"
        assert tag and tag != "latest", f"{name}: pin a version, not {image!r}"
    ours = [n for n, s in SERVICES.items() if built_from_our_dockerfile(s)]
    assert sorted(ours) == ["coordinator", "worker"]
    assert len({SERVICES[n]["image"] for n in ours}) == 1, "one image for both"


def test_published_ports_are_bound_to_loopback():
    published = 0
    for name, service in SERVICES.items():
        for port in service.get("ports", []):
            published += 1
            assert isinstance(port, str) and port.startswith("127.0.0.1:"), f"{name}: {port!r} is reachable from the network"
    assert published >= 4


def test_every_service_has_a_healthcheck():
    for name, service in SERVICES.items():
        check = service.get("healthcheck")
        assert check and not check.get("disable"), f"{name} has no healthcheck"
        assert check["test"][0] in ("CMD", "CMD-SHELL") and len(check["test"]) > 1, name


def test_jaeger_receives_otlp_and_everyone_sends_there():
    jaeger = SERVICES["jaeger"]
    assert jaeger["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    assert {p.rsplit(":", 1)[1] for p in jaeger["ports"]} == {"16686", "4317", "4318"}
    for name in ("coordinator", "worker"):
        endpoint = SERVICES[name]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"]
        assert endpoint == "http://jaeger:4317", name


def test_workers_scale_with_compose_scale():
    worker = SERVICES["worker"]
    assert "container_name" not in worker, "--scale needs generated container names"
    assert "ports" not in worker, "a fixed host port would clash between copies"
    assert worker["command"] == ["backfill-worker"]
    for dependency in ("postgres", "rabbitmq", "redis"):
        assert worker["depends_on"][dependency]["condition"] == "service_healthy"


def test_coordinator_and_workers_share_broker_key_and_prefix():
    coordinator, worker = SERVICES["coordinator"]["environment"], SERVICES["worker"]["environment"]
    for name in ("BACKFILL_BROKER_URL", "BACKFILL_HMAC_KEY", "BACKFILL_QUEUE_PREFIX", "BACKFILL_WAREHOUSE_DEMO_URL"):
        assert coordinator[name] == worker[name], name
    assert worker["BACKFILL_WORKER_LISTEN"] == "0.0.0.0:9464"
    # the signing key: yours from the environment, else a demo default of the minimum length
    default = re.fullmatch(r"\$\{BACKFILL_HMAC_KEY:-(.+)\}", worker["BACKFILL_HMAC_KEY"]).group(1)
    assert len(default) >= 16


def test_coordinator_runs_the_mini_challenge_spec_mounted_read_only():
    coordinator = SERVICES["coordinator"]
    source, target, mode = coordinator["volumes"][0].split(":")
    assert (DEPLOY / source).resolve() == REPO / "examples" / "mini_challenge.toml" and mode == "ro"
    assert coordinator["command"][:3] == ["backfill", "run", target]
    spec = tomllib.loads((REPO / "examples" / "mini_challenge.toml").read_text())
    variable = "BACKFILL_WAREHOUSE_%s_URL" % re.sub(r"[^A-Za-z0-9]", "_", spec["warehouse"]["name"]).upper()
    assert variable in coordinator["environment"], "the spec's warehouse needs its URL"
    assert SERVICES["worker"]["environment"]["BACKFILL_WORKER_WAREHOUSES"] == spec["warehouse"]["name"]
    assert coordinator["environment"][variable].endswith("@postgres:5432/analytics")


def test_postgres_is_seeded_with_the_mini_challenge():
    postgres = SERVICES["postgres"]
    source, target, mode = postgres["volumes"][0].split(":")
    assert (DEPLOY / source).resolve() == DEPLOY / "mini_challenge.sql" and (DEPLOY / source).is_file()
    assert target.startswith("/docker-entrypoint-initdb.d/") and mode == "ro"
    assert postgres["environment"]["POSTGRES_DB"] == "analytics"


# --- Dockerfile -----------------------------------------------------------------------------


def stages():
    """[(image, name, [instructions])] of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE)
    result = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        if instruction.upper() == "FROM":
            words = rest.split()
            result.append((words[0], words[2] if len(words) > 2 else None, []))
        else:
            result[-1][2].append((instruction.upper(), rest.strip()))
    return result


def cargo_commands(text):
    return [c.strip() for c in re.findall(r"(cargo (?:build|clippy|test|nextest run)[^\n&;|]*)", text)]


def test_dockerfile_builds_with_the_flags_ci_uses():
    (build_image, build_name, build), (runtime_image, _, runtime) = stages()
    assert build_image.startswith("rust:") and build_name
    (command,) = [c for c in cargo_commands(" ".join(r for i, r in build if i == "RUN"))]
    words = shlex.split(command)
    assert words[:2] == ["cargo", "build"] and "--release" in words
    for ci_command in cargo_commands((REPO / "scripts" / "test.sh").read_text()):
        assert "--locked" in ci_command, f"scripts/test.sh: {ci_command}"
    assert "--locked" in words, "the image must build the dependency versions CI tested"
    binaries = [words[i + 1] for i, word in enumerate(words) if word == "--bin"]
    declared = set()
    for manifest in REPO.glob("*/Cargo.toml"):
        declared |= {b["name"] for b in tomllib.loads(manifest.read_text()).get("bin", [])}
    assert sorted(binaries) == ["backfill", "backfill-worker"] and set(binaries) <= declared


def test_dockerfile_toolchain_and_runtime_match_the_workspace():
    (build_image, _, _), (runtime_image, _, runtime) = stages()
    toolchain = re.match(r"rust:(\d+)\.(\d+)-(\w+)$", build_image)
    assert toolchain, build_image
    required = tomllib.loads((REPO / "Cargo.toml").read_text())["workspace"]["package"]["rust-version"]
    assert tuple(map(int, toolchain.group(1, 2))) >= tuple(map(int, required.split(".")[:2]))
    # the binaries link glibc dynamically: the runtime must be the build image's Debian release
    assert runtime_image in (f"debian:{toolchain.group(3)}-slim", "gcr.io/distroless/cc-debian12")
    instructions = dict(runtime)
    assert instructions["USER"].split(":")[0] == "10001"
    assert "HEALTHCHECK" in instructions
    copies = [r for i, r in runtime if i == "COPY"]
    assert any("/out/backfill " in c and "/out/backfill-worker" in c and c.endswith("/usr/local/bin/") for c in copies)
    for copy in copies:
        if not copy.startswith("--from="):
            assert (REPO / copy.split()[0]).is_file(), copy


def test_dockerignore_keeps_build_output_and_history_out_of_the_context():
    ignored = {line.strip().rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")}
    assert {"target", ".git"} <= ignored
    assert not any(p in ignored for p in ("deploy", "examples", "Cargo.lock")), "the build needs these"


# --- the image's healthcheck script ---------------------------------------------------------


class Status(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        self.send_response(self.status if self.path == "/readyz" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


def serve(status):
    handler = type("Handler", (Status,), {"status": status})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def healthcheck(**environment):
    clean = {k: v for k, v in os.environ.items() if not k.endswith("_LISTEN")}
    return subprocess.run(["bash", str(DEPLOY / "healthcheck.sh")], env={**clean, **environment}, timeout=20).returncode


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("variable", ["BACKFILL_WORKER_LISTEN", "BACKFILL_SERVE_LISTEN"])
def test_healthcheck_asks_readyz_on_the_listen_address(variable):
    ready, not_ready = serve(200), serve(503)
    try:
        assert healthcheck(**{variable: f"0.0.0.0:{ready.server_port}"}) == 0
        assert healthcheck(**{variable: f"127.0.0.1:{ready.server_port}"}) == 0
        assert healthcheck(**{variable: f"0.0.0.0:{not_ready.server_port}"}) == 1
        assert healthcheck(**{variable: f"0.0.0.0:{free_port()}"}) != 0
    finally:
        ready.shutdown()
        not_ready.shutdown()


def test_healthcheck_of_a_one_shot_command_is_healthy_while_it_runs():
    assert healthcheck() == 0
