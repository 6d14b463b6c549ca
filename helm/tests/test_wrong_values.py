"""Wrong values are refused at install time (values.schema.json, or the templates' `fail`)
with a message that names the value and says what would be right."""

import helm_python as helm
import pytest

from conftest import MINI_CHALLENGE_SPEC, case_values, overlay


def spec_with(old, new):
    assert old in MINI_CHALLENGE_SPEC
    return MINI_CHALLENGE_SPEC.replace(old, new)


def with_backfills(*backfills):
    values = case_values("defaults", with_backfill=False)
    values["backfills"] = list(backfills)
    return values


WRONG = [
    # --- the schema
    ("replicas-not-a-number", overlay(case_values("defaults"), {"worker": {"replicas": "two"}}), ["/worker/replicas", "want integer"]),
    ("negative-replicas", overlay(case_values("defaults"), {"worker": {"replicas": -1}}), ["/worker/replicas", "minimum"]),
    ("unknown-top-level-key", overlay(case_values("defaults"), {"replica": 3}), ["additional properties 'replica' not allowed"]),
    ("unknown-worker-key", overlay(case_values("defaults"), {"worker": {"replica": 3}}), ["/worker", "'replica' not allowed"]),
    ("unknown-warehouse-key", overlay(case_values("defaults"), {"warehouses": {"demo": {"uri": "x"}}}), ["/warehouses/demo", "'uri' not allowed"]),
    ("log-format-not-in-enum", overlay(case_values("defaults"), {"logFormat": "yaml"}), ["/logFormat"]),
    ("pull-policy-not-in-enum", overlay(case_values("defaults"), {"image": {"pullPolicy": "Sometimes"}}), ["/image/pullPolicy"]),
    ("keda-max-zero", overlay(case_values("keda"), {"keda": {"maxReplicaCount": 0}}), ["/keda/maxReplicaCount", "minimum"]),
    ("slots-zero", overlay(case_values("defaults"), {"worker": {"slots": 0}}), ["/worker/slots", "minimum"]),
    ("duration-in-words", overlay(case_values("defaults"), {"worker": {"task": {"partitionTimeout": "5 minutes"}}}), ["/worker/task/partitionTimeout"]),
    ("grace-period-not-a-number", overlay(case_values("defaults"), {"worker": {"terminationGracePeriodSeconds": "long"}}), ["/worker/terminationGracePeriodSeconds"]),
    ("short-hmac-key", overlay(case_values("defaults"), {"hmac": {"key": "short"}}), ["/hmac/key"]),
    ("broker-url-not-amqp", overlay(case_values("defaults"), {"broker": {"url": "http://rabbitmq:15672"}}), ["/broker/url"]),
    ("warehouse-name-with-dot", overlay(case_values("defaults"), {"warehouses": {"a.b": {"url": "postgres://h/db"}}}), ["invalid propertyName 'a.b'", "does not match pattern"]),
    ("backfill-without-spec", with_backfills({"name": "fix"}), ["/backfills/0", "missing property 'spec'"]),
    ("backfill-name-not-dns", with_backfills({"name": "Fix_It", "spec": MINI_CHALLENGE_SPEC}), ["/backfills/0/name"]),
    # --- the templates
    ("grace-period-below-the-longest-task", overlay(case_values("defaults"), {"worker": {"terminationGracePeriodSeconds": 60}}),
     ["worker.terminationGracePeriodSeconds (60) must be longer than the longest task a worker may hold (1388 s"]),
    ("grace-period-below-the-lease", overlay(case_values("defaults"), {"worker": {"leaseTtlSeconds": 2000, "terminationGracePeriodSeconds": 1500}}),
     ["worker.terminationGracePeriodSeconds (1500) must be longer", "worker.leaseTtlSeconds (2000)"]),
    ("spec-allows-longer-tasks-than-the-grace-period", with_backfills({"name": "slow", "spec": spec_with('partition_timeout = "5m"', 'partition_timeout = "2h"')}),
     ["backfills[0] (slow): its spec lets a worker hold one task up to 28823 s", "termination grace period of 1418 s"]),
    ("spec-bad-duration", with_backfills({"name": "odd", "spec": spec_with('partition_timeout = "5m"', 'partition_timeout = "soon"')}),
     ["backfills[0] (odd) [execution] partition timeout: `soon` is not a duration"]),
    ("spec-not-toml", with_backfills({"name": "broken", "spec": "name = \n[target"}), ["backfills[0] (broken): spec is not valid TOML"]),
    ("spec-on-an-unconfigured-warehouse", with_backfills({"name": "elsewhere", "spec": spec_with('name = "demo"', 'name = "lake"')}),
     ["backfills[0] (elsewhere): spec runs on warehouse `lake`, which is not configured under `warehouses` (configured: demo)"]),
    ("spec-without-warehouse", with_backfills({"name": "nowhere", "spec": 'name = "x"\n[target]\ntable = "t"\n'}), ["backfills[0] (nowhere): spec has no [warehouse] name"]),
    ("same-backfill-twice", with_backfills({"name": "fix", "spec": MINI_CHALLENGE_SPEC}, {"name": "fix", "spec": MINI_CHALLENGE_SPEC}),
     ["backfills[1] (fix): the name is used twice"]),
    ("no-broker", overlay(case_values("defaults"), {"broker": {"url": ""}}), ["broker: set broker.url", "or broker.existingSecret"]),
    ("no-redis", overlay(case_values("defaults"), {"redis": {"url": ""}}), ["redis: set redis.url"]),
    ("no-signing-key", overlay(case_values("defaults"), {"hmac": {"key": ""}}), ["hmac: set hmac.key", "or hmac.existingSecret"]),
    ("no-warehouse", {**case_values("defaults", with_backfill=False), "warehouses": {}}, ["warehouses: configure at least one warehouse"]),
    ("warehouse-without-url", overlay(case_values("defaults"), {"warehouses": {"demo": {"url": ""}}}), ["warehouses.demo: set url", "or existingSecret"]),
    ("worker-on-an-unknown-warehouse", overlay(case_values("defaults"), {"worker": {"warehouses": ["lake"]}}),
     ["worker.warehouses names `lake`, which is not configured under `warehouses`"]),
    ("spec-no-worker-consumes", overlay(case_values("keda"), {"worker": {"warehouses": ["events-eu"]}}),
     ["spec runs on warehouse `demo`, but the workers only consume events-eu"]),
    ("serve-on-an-unknown-warehouse", overlay(case_values("defaults"), {"serve": {"enabled": True, "warehouse": "lake"}}),
     ["serve.warehouse `lake` is not configured"]),
]


@pytest.mark.parametrize("values, fragments", [pytest.param(v, f, id=name) for name, v, f in WRONG])
def test_wrong_values_are_refused_with_a_clear_message(chart, values, fragments):
    with pytest.raises(helm.HelmError) as refused:
        chart.render(values)
    message = str(refused.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"


def test_the_values_files_themselves_are_accepted(chart):
    # the refusals above are not the chart refusing everything
    for name in ["defaults", "keda", "existing-secrets", "serve-monitoring"]:
        chart.render(case_values(name))
