#!/usr/bin/env bash
# The whole test suite, as CI runs it: make sure PostgreSQL, MariaDB, Redis and RabbitMQ are up, check formatting and lints,
# build every target (the integration tests drive the real `backfill` binary), run all tests, the benchmark
# harness at smoke size, then the tests of deploy/ and helm/ (scripts/test-deploy.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# start_service PORT NAME COMMAND...: start a local service whose port is closed, then wait.
start_service() {
  local port=$1 name=$2; shift 2
  port_open "$port" && return 0
  echo "$name is not answering on 127.0.0.1:$port; starting it" >&2
  "$@" || true
  for _ in $(seq 1 60); do port_open "$port" && return 0; sleep 1; done
  echo "$name did not start on port $port" >&2
  exit 1
}

start_service 5432 PostgreSQL pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start
start_service 6379 Redis redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
  --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
start_service 5672 RabbitMQ rabbitmq-server -detached
start_service 3306 MariaDB start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo build --workspace --all-targets --locked
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked --no-fail-fast
fi
# The benchmark harness at smoke size, as built above (next to the debug binaries it drives; `cargo run -p`
# would unify features differently and rebuild): every section runs and every run's result is checked;
# timings are reported, never asserted.
"${CARGO_TARGET_DIR:-target}/debug/backfill-bench" --quick
./scripts/test-deploy.sh
