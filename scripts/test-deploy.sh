#!/usr/bin/env bash
# Tests of deploy/ (Dockerfile, compose stack) and helm/ (the chart): lint and render the
# chart with Helm's own library, validate every manifest against the Kubernetes schemas, check
# the compose file and the image, and run the compose walkthrough against the local services.
# No Docker engine or cluster needed. Python packages go to a venv under target/ (PyPI only),
# reinstalled when helm/tests/requirements.txt changes. scripts/test.sh runs this after the
# cargo steps (the walkthrough test drives the binaries they build).
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/deploy-venv
requirements=helm/tests/requirements.txt
stamp=$venv/.requirements.sha256
wanted=$(sha256sum "$requirements" | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  echo "installing the deploy test dependencies into $venv" >&2
  rm -rf "$venv"
  if python3 -m venv "$venv" 2>/dev/null; then
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --requirement "$requirements"
  else
    # no ensurepip (Debian without python3-venv): an empty venv, filled by the system's pip
    rm -rf "$venv"
    python3 -m venv --without-pip "$venv"
    python3 -m pip --python "$venv/bin/python" install --quiet --disable-pip-version-check \
      --requirement "$requirements"
  fi
  echo "$wanted" >"$stamp"
fi

cd helm/tests
PYTHONDONTWRITEBYTECODE=1 exec "../../$venv/bin/python" -m pytest -p no:cacheprovider "$@"
