#!/usr/bin/env bash
# Stop the servers started by start_test_servers.sh (data stays in $D2L_TEST_SERVERS_DIR).
set -uo pipefail

STATE="${D2L_TEST_SERVERS_DIR:-/tmp/d2l-test-servers}"
PGBIN="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"

if [ -n "$PGBIN" ] && [ -s "$STATE/pg/data/PG_VERSION" ]; then
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$PGBIN/pg_ctl" -D "$STATE/pg/data" -m fast stop || true
    else
        "$PGBIN/pg_ctl" -D "$STATE/pg/data" -m fast stop || true
    fi
fi
if [ -s "$STATE/moto.pid" ]; then
    kill "$(cat "$STATE/moto.pid")" 2>/dev/null || true
    rm -f "$STATE/moto.pid"
fi
