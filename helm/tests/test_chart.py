"""The Helm chart: lint, render with every values file, validate every manifest against the
Kubernetes schemas, and assert on what was rendered."""

import base64
import re

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from conftest import (
    CHART,
    CUSTOM_KINDS,
    MINI_CHALLENGE_SPEC,
    NAMESPACE,
    REPO,
    VALUES_FILES,
    case_values,
    env_of,
    native_stderr_captured,
    overlay,
    selector_matches,
)

# A recent Kubernetes whose schemas kubernetes-validate ships.
KUBERNETES_VERSION = "1.35"
SECRET_ENV = re.compile(r"^BACKFILL_(BROKER_URL|REDIS_URL|WAREHOUSE_URL|WAREHOUSE_[A-Z0-9_]+_URL|HMAC_KEY)$")


def seconds(duration):
    """The spec's durations (500ms, 30s, 5m, 2h) in whole seconds, rounded up."""
    number, unit = re.fullmatch(r"(\d+)(ms|s|m|h)", duration).groups()
    return {"ms": -(-int(number) // 1000), "s": int(number), "m": int(number) * 60, "h": int(number) * 3600}[unit]


def longest_task_hold(partition_timeout, retries, backoff_max):
    """How long a worker holds one task before it gives it back (worker/src/execute.rs): every
    attempt runs to its client timeout, the partition timeout plus 2 s, and every retry waits
    up to backoff_max."""
    return (retries + 1) * (seconds(partition_timeout) + 2) + retries * seconds(backoff_max)


def worker(rendered):
    return rendered.one("Deployment", "-worker")


def worker_container(rendered):
    return worker(rendered)["spec"]["template"]["spec"]["containers"][0]


# --- lint -------------------------------------------------------------------------------


def lint_errors(values=None):
    with native_stderr_captured():
        report = helm.lint(str(CHART), values, strict=True, namespace=NAMESPACE)
    # severity 2 = warning, 3 = error; --strict fails on both
    return [m for m in report["messages"] if m["severity"] >= 2] + [{"error": e} for e in report["errors"]]


def test_lint_strict_passes_with_the_chart_defaults():
    assert lint_errors() == []


@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_lint_strict_passes_with_each_values_file(values_file):
    assert lint_errors(case_values(values_file)) == []


def test_lint_strict_reports_values_the_schema_rejects():
    errors = lint_errors(overlay(case_values("defaults"), {"worker": {"replicas": "two"}}))
    assert errors, "lint accepted worker.replicas: two"
    assert any("/worker/replicas" in e["error"] for e in errors), errors


# --- rendering and Kubernetes schemas -------------------------------------------------------


@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_every_manifest_is_valid_for_kubernetes(chart, values_file):
    rendered = chart.render(case_values(values_file))
    kinds = sorted(o["kind"] for o in rendered.objects)
    assert {"Deployment", "Job", "ConfigMap", "ServiceAccount", "PodDisruptionBudget"} <= set(kinds), kinds
    for manifest in rendered.objects:
        if manifest["kind"] in CUSTOM_KINDS:
            continue  # asserted on in the tests below
        try:
            kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(p) for p in error.path)
            pytest.fail(f"{values_file}: {manifest['kind']}/{manifest['metadata']['name']}: {path}: {error.message}")
        assert manifest["metadata"]["name"] and len(manifest["metadata"]["name"]) <= 63


def test_the_chart_renders_what_each_values_file_asks_for(chart):
    kinds = {name: sorted(o["kind"] for o in chart.render(case_values(name)).objects) for name in VALUES_FILES}
    assert "ScaledObject" not in kinds["defaults"] and "ServiceMonitor" not in kinds["defaults"]
    assert kinds["keda"].count("ScaledObject") == 1 and kinds["keda"].count("TriggerAuthentication") == 1
    assert "Secret" not in kinds["existing-secrets"]
    assert kinds["serve-monitoring"].count("ServiceMonitor") == 1
    assert kinds["serve-monitoring"].count("Service") == 2  # serve, and the workers' headless one
    assert kinds["serve-monitoring"].count("Deployment") == 2


def test_without_backfills_only_the_workers_are_installed(chart):
    rendered = chart.render(case_values("defaults", with_backfill=False))
    assert rendered.all("Job") == []
    assert "No backfill yet" in rendered.notes
    assert worker(rendered)["spec"]["replicas"] == 2


# --- workers --------------------------------------------------------------------------------


def test_replicas_are_fixed_without_keda_and_omitted_with_it(chart):
    fixed = chart.render(overlay(case_values("defaults"), {"worker": {"replicas": 4}}))
    assert worker(fixed)["spec"]["replicas"] == 4
    scaled = chart.render(overlay(case_values("keda"), {"worker": {"replicas": 4}}))
    assert "replicas" not in worker(scaled)["spec"], "KEDA owns the replica count; the Deployment must not fight it"


def test_keda_scales_the_workers_on_each_task_queue_with_the_broker_secret(chart):
    rendered = chart.render(case_values("keda"))
    scaled = rendered.one("ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"]["name"] == worker(rendered)["metadata"]["name"]
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == (0, 20)
    triggers = scaled["spec"]["triggers"]
    # the queue names the broker declares: <prefix>.tasks.<warehouse> (common/src/broker.rs)
    assert sorted(t["metadata"]["queueName"] for t in triggers) == [
        "analytics-backfill.tasks.demo",
        "analytics-backfill.tasks.events-eu",
    ]
    authentication = rendered.one("TriggerAuthentication")
    for trigger in triggers:
        assert trigger["type"] == "rabbitmq" and trigger["metadata"]["mode"] == "QueueLength"
        assert trigger["metadata"]["value"] == "3"
        assert trigger["authenticationRef"]["name"] == authentication["metadata"]["name"]
        assert "host" not in trigger["metadata"], "the broker URL must come from the Secret"
    (target,) = authentication["spec"]["secretTargetRef"]
    secret = rendered.one("Secret")
    assert target["name"] == secret["metadata"]["name"] and target["key"] in secret["data"]
    environment = env_of(worker_container(rendered))
    assert environment["BACKFILL_WORKER_WAREHOUSES"]["value"] == "demo,events-eu"
    assert "BACKFILL_WAREHOUSE_EVENTS_EU_URL" in environment


def test_grace_period_outlasts_the_longest_task_and_the_lease(chart):
    values = case_values("defaults")
    rendered = chart.render(values)
    grace = worker(rendered)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    chart_task = yaml.safe_load((CHART / "values.yaml").read_text())["worker"]["task"]
    hold = longest_task_hold(chart_task["partitionTimeout"], chart_task["retries"], chart_task["backoffMax"])
    assert grace > hold and grace > 30
    assert grace == hold + 30  # derived, not a constant someone has to keep in step
    # the mini challenge's own [execution] fits too
    assert longest_task_hold("5m", 3, "5s") < grace
    # longer tasks raise the derived grace period with them
    longer = chart.render(overlay(values, {"worker": {"task": {"partitionTimeout": "20m", "retries": 1}}}))
    longer_grace = worker(longer)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert longer_grace == longest_task_hold("20m", 1, "60s") + 30
    # an explicit one is kept when it is long enough
    explicit = chart.render(overlay(values, {"worker": {"terminationGracePeriodSeconds": 3600}}))
    assert worker(explicit)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 3600


def test_worker_probes_ask_the_worker_listen_address(chart):
    container = worker_container(chart.render(case_values("defaults")))
    (port,) = container["ports"]
    assert (port["name"], port["containerPort"]) == ("http", 9464)
    assert env_of(container)["BACKFILL_WORKER_LISTEN"]["value"] == "0.0.0.0:9464"
    assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["command"] == ["backfill-worker"] and "args" not in container


def test_worker_settings_arrive_as_environment_variables(chart):
    rendered = chart.render(
        overlay(case_values("defaults"), {"worker": {"slots": 3, "leaseTtlSeconds": 45}, "broker": {"queuePrefix": "bf-prod"}})
    )
    container = worker_container(rendered)
    environment = env_of(container)
    assert environment["BACKFILL_WORKER_SLOTS"]["value"] == "3"
    assert environment["BACKFILL_LEASE_TTL"]["value"] == "45s"
    assert environment["BACKFILL_WORKER_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    config = rendered.one("ConfigMap", "-env")
    assert container["envFrom"] == [{"configMapRef": {"name": config["metadata"]["name"]}}]
    assert config["data"]["BACKFILL_QUEUE_PREFIX"] == "bf-prod"
    assert config["data"]["BACKFILL_HMAC_KEY_FILE"] == "/etc/backfill/hmac/hmac-key"


def test_pod_disruption_budget_covers_the_workers(chart):
    rendered = chart.render(case_values("keda"))
    budget = rendered.one("PodDisruptionBudget")
    assert budget["spec"]["maxUnavailable"] == 1
    assert selector_matches(budget["spec"]["selector"], worker(rendered)["spec"]["template"]["metadata"]["labels"])
    for job in rendered.all("Job"):
        assert not selector_matches(budget["spec"]["selector"], job["spec"]["template"]["metadata"]["labels"])


# --- secrets --------------------------------------------------------------------------------

SECRET_VALUES = [
    "broker-password-7f3a",
    "redis-password-91c2",
    "warehouse-password-4be8",
    "hmac-key-value-0d5e9a1c77b24f31",
]


def test_secret_values_only_ever_appear_inside_the_chart_secret(chart):
    rendered = chart.render(case_values("serve-monitoring"))
    secret = rendered.one("Secret")
    decoded = {key: base64.b64decode(value).decode() for key, value in secret["data"].items()}
    for value in SECRET_VALUES:
        assert any(value in text for text in decoded.values())
        outside = [o for o in rendered.objects if o["kind"] != "Secret" and value in yaml.safe_dump(o)]
        assert outside == [], f"{value} appears in {[o['kind'] for o in outside]}"
        assert value not in rendered.notes


@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_secrets_reach_containers_only_through_secret_references(chart, values_file):
    rendered = chart.render(case_values(values_file))
    for container in rendered.containers():
        for variable in container.get("env", []):
            if SECRET_ENV.match(variable["name"]):
                assert "value" not in variable, f"{container['name']}: {variable['name']} is inlined"
                assert "secretKeyRef" in variable["valueFrom"]
        for variable in container.get("env", []):
            assert "@" not in str(variable.get("value", "")), f"{variable['name']} looks like a URL with credentials"
    for config in rendered.all("ConfigMap"):
        assert not any(SECRET_ENV.match(key) for key in config["data"]), config["metadata"]["name"]


def test_existing_secrets_are_referenced_by_name_and_key(chart):
    rendered = chart.render(case_values("existing-secrets"))
    assert rendered.all("Secret") == [], "nothing to put in a chart Secret"
    expected = {
        "BACKFILL_BROKER_URL": ("rabbitmq-backfill", "amqp-url"),
        "BACKFILL_REDIS_URL": ("redis-backfill", "url"),
        "BACKFILL_WAREHOUSE_DEMO_URL": ("analytics-warehouse", "dsn"),
    }
    container = worker_container(rendered)
    environment = env_of(container)
    for name, (secret, key) in expected.items():
        assert environment[name]["valueFrom"]["secretKeyRef"] == {"name": secret, "key": key}
    assert "BACKFILL_HMAC_KEY" not in environment, "the key is a file, not a variable"
    volumes = {v["name"]: v for v in worker(rendered)["spec"]["template"]["spec"]["volumes"]}
    assert volumes["hmac-key"]["secret"]["secretName"] == "backfill-signing"
    assert volumes["hmac-key"]["secret"]["items"] == [{"key": "current", "path": "hmac-key"}]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["hmac-key"]["mountPath"] == "/etc/backfill/hmac" and mounts["hmac-key"]["readOnly"] is True
    assert rendered.one("ConfigMap", "-env")["data"]["BACKFILL_HMAC_KEY_ID"] == "k2"
    job = rendered.one("Job")
    job_env = env_of(job["spec"]["template"]["spec"]["containers"][0])
    assert job_env["BACKFILL_BROKER_URL"]["valueFrom"]["secretKeyRef"] == {"name": "rabbitmq-backfill", "key": "amqp-url"}


def test_every_process_gets_the_signing_key_as_a_file(chart):
    rendered = chart.render(case_values("serve-monitoring"))
    secret_name = rendered.one("Secret")["metadata"]["name"]
    for workload in rendered.workloads():
        pod = workload["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["hmac-key"]["secret"]["secretName"] == secret_name
        assert volumes["hmac-key"]["secret"]["items"] == [{"key": "hmac-key", "path": "hmac-key"}]
        for container in pod["containers"]:
            assert any(m["mountPath"] == "/etc/backfill/hmac" for m in container["volumeMounts"])


# --- security -------------------------------------------------------------------------------


@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_every_pod_runs_non_root_on_a_read_only_root_filesystem(chart, values_file):
    rendered = chart.render(case_values(values_file))
    account = rendered.one("ServiceAccount")
    assert account["automountServiceAccountToken"] is False
    assert rendered.workloads()
    for workload in rendered.workloads():
        pod = workload["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == account["metadata"]["name"]
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 10001  # the image's user (deploy/Dockerfile)
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]
            assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
            # the only writable place
            assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"])


# --- checksums ------------------------------------------------------------------------------


def pod_annotations(rendered):
    return {w["metadata"]["name"]: w["spec"]["template"]["metadata"]["annotations"] for w in rendered.workloads()}


def test_checksum_annotations_change_with_the_configuration_they_cover(chart):
    values = case_values("serve-monitoring")
    base = chart.render(values)
    annotations = pod_annotations(base)
    assert len(annotations) == 3  # worker, serve, coordinator Job
    for name, annotation in annotations.items():
        assert re.fullmatch(r"[0-9a-f]{64}", annotation["checksum/config"]), name
        assert re.fullmatch(r"[0-9a-f]{64}", annotation["checksum/secret"]), name
    again = chart.render(values)
    assert pod_annotations(again) == annotations, "rendering is deterministic"

    worker_name = worker(base)["metadata"]["name"]
    new_prefix = pod_annotations(chart.render(overlay(values, {"broker": {"queuePrefix": "other"}})))
    assert new_prefix[worker_name]["checksum/config"] != annotations[worker_name]["checksum/config"]
    assert new_prefix[worker_name]["checksum/secret"] == annotations[worker_name]["checksum/secret"]

    new_url = pod_annotations(chart.render(overlay(values, {"broker": {"url": "amqp://backfill:rotated@rabbitmq:5672/%2f"}})))
    assert new_url[worker_name]["checksum/secret"] != annotations[worker_name]["checksum/secret"]
    assert new_url[worker_name]["checksum/config"] == annotations[worker_name]["checksum/config"]

    existing = case_values("existing-secrets")
    moved = pod_annotations(chart.render(overlay(existing, {"redis": {"existingSecretKey": "other-key"}})))
    assert moved[worker_name]["checksum/secret"] != pod_annotations(chart.render(existing))[worker_name]["checksum/secret"]


def test_a_changed_spec_makes_a_new_job_and_an_unchanged_one_keeps_its_name(chart):
    values = case_values("defaults")
    job = chart.render(values).one("Job")
    assert chart.render(values).one("Job")["metadata"]["name"] == job["metadata"]["name"]
    changed = overlay(values, {})
    changed["backfills"][0]["spec"] = MINI_CHALLENGE_SPEC.replace("concurrency = 2", "concurrency = 3")
    changed_job = chart.render(changed).one("Job")
    assert changed_job["metadata"]["name"] != job["metadata"]["name"]
    assert (
        changed_job["spec"]["template"]["metadata"]["annotations"]["checksum/spec"]
        != job["spec"]["template"]["metadata"]["annotations"]["checksum/spec"]
    )


# --- coordinator Job ------------------------------------------------------------------------


def test_the_coordinator_job_runs_the_spec_from_its_config_map(chart):
    rendered = chart.render(case_values("defaults"))
    job = rendered.one("Job")
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["backfill"]
    assert container["args"][:2] == ["run", "/etc/backfill/spec/spec.toml"]
    assert "--no-progress" in container["args"]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/etc/backfill/spec")
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    config = rendered.one("ConfigMap", "fix-doubled-quantity-spec")
    assert volume["configMap"]["name"] == config["metadata"]["name"]
    assert config["data"]["spec.toml"] == MINI_CHALLENGE_SPEC
    assert pod["restartPolicy"] == "Never"
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0]["action"] == "FailJob" and rules[0]["onExitCodes"]["values"] == [2, 3, 4]
    environment = env_of(container)
    # the spec says warehouse.name = "demo": only that warehouse's URL, and no Redis (unused)
    assert [n for n in environment if n.startswith("BACKFILL_WAREHOUSE_")] == ["BACKFILL_WAREHOUSE_DEMO_URL"]
    assert "BACKFILL_BROKER_URL" in environment and "BACKFILL_REDIS_URL" not in environment


def test_each_backfill_gets_its_own_job(chart):
    second = MINI_CHALLENGE_SPEC.replace('name = "fix_doubled_quantity"', 'name = "second"').replace(
        'name = "demo"', 'name = "events-eu"'
    )
    values = case_values("keda")
    values["backfills"].append({"name": "events", "spec": second})
    rendered = chart.render(values)
    jobs = {j["metadata"]["labels"]["backfill/name"]: j for j in rendered.all("Job")}
    assert sorted(jobs) == ["events", "fix-doubled-quantity"]
    events_env = env_of(jobs["events"]["spec"]["template"]["spec"]["containers"][0])
    assert [n for n in events_env if n.startswith("BACKFILL_WAREHOUSE_")] == ["BACKFILL_WAREHOUSE_EVENTS_EU_URL"]


# --- serve, metrics, notes ------------------------------------------------------------------


def test_serve_deployment_and_service(chart):
    rendered = chart.render(case_values("serve-monitoring"))
    serve = rendered.one("Deployment", "-serve")
    (container,) = serve["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["backfill"] and container["args"] == ["serve"]
    environment = env_of(container)
    assert environment["BACKFILL_SERVE_LISTEN"]["value"] == "0.0.0.0:8080"
    assert environment["BACKFILL_WAREHOUSE_URL"]["valueFrom"]["secretKeyRef"]["key"] == "warehouse-demo-url"
    assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    service = rendered.one("Service", "-serve")
    assert selector_matches({"matchLabels": service["spec"]["selector"]}, serve["spec"]["template"]["metadata"]["labels"])
    assert service["spec"]["ports"][0]["targetPort"] == "http"


def test_service_monitor_scrapes_workers_and_serve(chart):
    rendered = chart.render(case_values("serve-monitoring"))
    monitor = rendered.one("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")
    services = rendered.all("Service")
    assert {s["metadata"]["name"] for s in services if selector_matches(monitor["spec"]["selector"], s["metadata"]["labels"])} == {
        s["metadata"]["name"] for s in services
    }
    workers = rendered.one("Service", "-worker")
    assert workers["spec"]["clusterIP"] == "None" and workers["spec"]["publishNotReadyAddresses"] is True
    assert selector_matches({"matchLabels": workers["spec"]["selector"]}, worker(rendered)["spec"]["template"]["metadata"]["labels"])
    for service in services:
        assert [p["name"] for p in service["spec"]["ports"]] == ["http"]


def test_telemetry_uses_the_standard_opentelemetry_variables(chart):
    rendered = chart.render(case_values("serve-monitoring"))
    config = rendered.one("ConfigMap", "-env")["data"]
    assert config["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger-collector.observability:4317"
    assert config["OTEL_EXPORTER_OTLP_PROTOCOL"] == "grpc"
    assert config["BACKFILL_LOG"] == "info"
    assert config["BACKFILL_LOG_FORMAT"] == "json"
    names = set()
    for container in rendered.containers():
        environment = env_of(container)
        names.add(environment["OTEL_SERVICE_NAME"]["value"])
        attributes = environment["OTEL_RESOURCE_ATTRIBUTES"]["value"]
        assert "k8s.pod.name=$(POD_NAME)" in attributes and "deployment.environment=production" in attributes
    assert names == {"backfill-worker", "backfill-serve", "backfill-coordinator"}
    quiet = chart.render(case_values("defaults")).one("ConfigMap", "-env")["data"]
    assert not any(key.startswith("OTEL_") for key in quiet), "tracing is off until an endpoint is given"


def test_notes_tell_how_to_watch_the_run(chart):
    rendered = chart.render(case_values("serve-monitoring"))
    job = rendered.one("Job")["metadata"]["name"]
    notes = rendered.notes
    assert f"kubectl -n {NAMESPACE} logs -f job/{job}" in notes
    assert f"kubectl -n {NAMESPACE} exec deploy/{worker(rendered)['metadata']['name']} -- backfill status --warehouse demo" in notes
    assert "https://jaeger.example.com" in notes and "backfill-coordinator" in notes
    assert "port-forward svc/bf-backfill-serve 8080:8080" in notes
    # a spec with its own control store schema: status must look there
    values = case_values("defaults")
    values["backfills"][0]["spec"] = MINI_CHALLENGE_SPEC.replace('name = "demo"', 'name = "demo"\ncontrol_schema = "bf_control"')
    assert "backfill status --warehouse demo --control-schema bf_control" in chart.render(values).notes
    # a spec with an approval gate: the Job ends awaiting approval, the notes say how to publish
    assert "backfill publish" not in notes
    values["backfills"][0]["spec"] = values["backfills"][0]["spec"].replace('mode = "swap_table"', 'mode = "swap_table"\napproval = "manual"')
    assert "-- backfill publish <run> --warehouse demo --control-schema bf_control --owner <you>" in chart.render(values).notes
    keda_notes = chart.render(case_values("keda")).notes
    assert "kubectl -n data get scaledobject" in keda_notes
    assert "Tracing is off" in chart.render(case_values("defaults")).notes


# --- what the binaries read -----------------------------------------------------------------

def variables_the_binaries_read():
    names = set()
    for path in [*REPO.glob("worker/src/**/*.rs"), *REPO.glob("coordinator/src/**/*.rs"), *REPO.glob("common/src/**/*.rs")]:
        text = path.read_text()
        names.update(re.findall(r'env\s*=\s*"(BACKFILL_[A-Z0-9_]+)"', text))
        names.update(re.findall(r'env::var\(\s*"(BACKFILL_[A-Z0-9_]+)"', text))
        names.update(re.findall(r'from_env\(\s*"(BACKFILL_[A-Z0-9_]+)"', text))  # tracing's EnvFilter
        for pair in re.findall(r'secret_from_env\(\s*"(BACKFILL_[A-Z0-9_]+)",\s*"(BACKFILL_[A-Z0-9_]+)"', text):
            names.update(pair)  # common/src/envelope.rs: a secret or the file holding it
        if '"BACKFILL_WAREHOUSE_{}_URL"' in text:
            names.add("BACKFILL_WAREHOUSE_<NAME>_URL")
    return names


def test_every_backfill_variable_the_chart_sets_is_one_the_binaries_read(chart):
    known = variables_the_binaries_read()
    assert {"BACKFILL_BROKER_URL", "BACKFILL_REDIS_URL", "BACKFILL_HMAC_KEY_FILE", "BACKFILL_WORKER_WAREHOUSES",
            "BACKFILL_WORKER_LISTEN", "BACKFILL_SERVE_LISTEN", "BACKFILL_LOG_FORMAT"} <= known
    rendered = chart.render(case_values("serve-monitoring"))
    names = {v["name"] for c in rendered.containers() for v in c.get("env", [])}
    names |= {k for c in rendered.all("ConfigMap") if c["metadata"]["name"].endswith("-env") for k in c["data"]}
    for name in sorted(n for n in names if n.startswith("BACKFILL_")):
        generic = re.sub(r"^BACKFILL_WAREHOUSE_(?!URL$)[A-Z0-9_]+_URL$", "BACKFILL_WAREHOUSE_<NAME>_URL", name)
        assert generic in known, f"{name} is set by the chart but read by no binary"


@pytest.mark.parametrize(
    "warehouse, variable",
    [("demo", "BACKFILL_WAREHOUSE_DEMO_URL"), ("events-eu", "BACKFILL_WAREHOUSE_EVENTS_EU_URL"), ("a_b9", "BACKFILL_WAREHOUSE_A_B9_URL")],
)
def test_warehouse_variable_names_follow_common_config(chart, warehouse, variable):
    # common/src/config.rs: upper-cased, anything but letters and digits becomes `_`
    values = case_values("defaults", with_backfill=False)
    values["warehouses"] = {warehouse: {"url": "postgres://u:p@h/db"}}
    assert variable in env_of(worker_container(chart.render(values)))
