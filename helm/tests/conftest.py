"""Shared helpers of the deploy tests: render the chart through Helm's own library
(helm-python-sdk), load the test values files, look things up in the rendered objects."""

import contextlib
import copy
import os
import tempfile
from pathlib import Path

import helm_python as helm
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "backfill"
VALUES_DIR = Path(__file__).resolve().parent / "values"
MINI_CHALLENGE_SPEC = (REPO / "examples" / "mini_challenge.toml").read_text()
RELEASE = "bf"
NAMESPACE = "data"
# Kinds whose schema is a CRD's, not Kubernetes' own: not schema-validated, asserted on instead.
CUSTOM_KINDS = {"ScaledObject", "TriggerAuthentication", "ServiceMonitor"}
VALUES_FILES = ["defaults", "keda", "existing-secrets", "serve-monitoring"]


def case_values(name, with_backfill=True):
    """A values file of helm/tests/values, plus the mini challenge as backfills[0] (what
    `--set-file 'backfills[0].spec=examples/mini_challenge.toml'` does)."""
    values = yaml.safe_load((VALUES_DIR / f"{name}.yaml").read_text()) or {}
    if with_backfill:
        values["backfills"] = [{"name": "fix-doubled-quantity", "spec": MINI_CHALLENGE_SPEC}]
    return values


def overlay(values, changes):
    """A deep copy of values with changes merged in (dicts merge, anything else replaces)."""
    merged = copy.deepcopy(values)

    def merge(into, new):
        for key, value in new.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value)
            else:
                into[key] = copy.deepcopy(value)

    merge(merged, changes)
    return merged


@contextlib.contextmanager
def native_stderr_captured():
    """Helm logs lint findings (e.g. its skipped `fail` calls) straight to file descriptor 2;
    keep them out of the test output, and hand them over as text."""
    captured = {"text": ""}
    with tempfile.TemporaryFile(mode="w+b") as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured["text"] = sink.read().decode(errors="replace")


class Rendered:
    """The objects one `helm template` produced, and its NOTES.txt."""

    def __init__(self, manifests):
        self.notes = ""
        self.objects = []
        self.text = ""
        for path, text in sorted(manifests.items()):
            if path.endswith("NOTES.txt"):
                self.notes = text
                continue
            self.text += text
            self.objects.extend(doc for doc in yaml.safe_load_all(text) if doc)

    def all(self, kind):
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind, name_suffix=""):
        found = [o for o in self.all(kind) if o["metadata"]["name"].endswith(name_suffix)]
        assert len(found) == 1, f"expected one {kind} named *{name_suffix}, found {[o['metadata']['name'] for o in found]}"
        return found[0]

    def workloads(self):
        """Every object with a pod template: Deployments and Jobs."""
        return [o for o in self.objects if o["kind"] in ("Deployment", "Job")]

    def containers(self):
        return [c for w in self.workloads() for c in w["spec"]["template"]["spec"]["containers"]]


class Chart:
    """The chart, loaded once; renders values as `helm template` would (schema included)."""

    def __init__(self):
        self.chart = helm.Chart.load(str(CHART))

    def render(self, values, name=RELEASE, namespace=NAMESPACE):
        return Rendered(self.chart.render(values, name=name, namespace=namespace))

    def close(self):
        self.chart.close()


@pytest.fixture(scope="session")
def chart():
    loaded = Chart()
    yield loaded
    loaded.close()


def env_of(container):
    return {e["name"]: e for e in container.get("env", [])}


def selector_matches(selector, labels):
    """Kubernetes label selector semantics (matchLabels and matchExpressions)."""
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        present = key in labels
        if operator == "In" and not (present and labels[key] in values):
            return False
        if operator == "NotIn" and present and labels[key] in values:
            return False
        if operator == "Exists" and not present:
            return False
        if operator == "DoesNotExist" and present:
            return False
    return True
