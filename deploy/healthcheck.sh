#!/bin/bash
# Container health for the backfill image, with no HTTP client installed: asks the process's
# own /readyz over bash's /dev/tcp. The address comes from the variable the process listens
# on (BACKFILL_WORKER_LISTEN for backfill-worker, BACKFILL_SERVE_LISTEN for `backfill serve`);
# a container with neither runs a one-shot command (`backfill run`), healthy while it runs.
set -u
listen=${BACKFILL_WORKER_LISTEN:-${BACKFILL_SERVE_LISTEN:-}}
[ -n "$listen" ] || exit 0
port=${listen##*:}
host=${listen%:*}
case "$host" in "" | 0.0.0.0 | "[::]" | "::") host=127.0.0.1 ;; esac
host=${host#[}
host=${host%]}
exec 3<>"/dev/tcp/$host/$port" || exit 1
printf 'GET /readyz HTTP/1.0\r\nHost: %s\r\n\r\n' "$host" >&3
read -r -t 4 _ status _ <&3 || exit 1
[ "$status" = 200 ]
