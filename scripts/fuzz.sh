#!/usr/bin/env bash
# Fuzzes the spec parser and the envelope decoder (tests/tests/fuzz.rs) for a bounded time:
# one random seed after another, each with many cases per target, until SECONDS (default 300)
# have passed. Every seed is printed; a failure prints proptest's minimal input, is saved in
# tests/tests/fuzz.regressions (replayed by every later run) and replays with the printed
# command. Turn what it finds into a named test at the end of fuzz.rs.
#
#   scripts/fuzz.sh [SECONDS]        FUZZ_CASES=<cases per target and seed> (default 5000)
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-300}
cases=${FUZZ_CASES:-5000}
case $seconds in '' | *[!0-9]*) echo "usage: $0 [SECONDS]" >&2; exit 2 ;; esac

cargo test -p backfill-tests --test fuzz --locked --no-run
deadline=$((SECONDS + seconds))
rounds=0
while ((SECONDS < deadline)); do
  seed=$(od -An -N8 -tu8 /dev/urandom | tr -d ' ')
  echo "fuzz: round $((rounds + 1)): PROPTEST_RNG_SEED=$seed PROPTEST_CASES=$cases"
  status=0
  PROPTEST_RNG_SEED=$seed PROPTEST_CASES=$cases \
    timeout --signal=TERM $((deadline - SECONDS + 1)) \
    cargo test -q -p backfill-tests --test fuzz --locked || status=$?
  if ((status == 124)); then
    echo "fuzz: time is up during round $((rounds + 1)) (not a failure)"
    break
  elif ((status != 0)); then
    echo "fuzz: FAILED; replay with:" >&2
    echo "  PROPTEST_RNG_SEED=$seed PROPTEST_CASES=$cases cargo test -p backfill-tests --test fuzz" >&2
    exit 1
  fi
  rounds=$((rounds + 1))
done
echo "fuzz: $rounds complete round(s) of $cases cases per target in ${SECONDS}s, no failure"
