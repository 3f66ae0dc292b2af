#!/usr/bin/env bash
# Start the servers d2l-store's tests use, on 127.0.0.1 only, installing them first if needed:
#   - PostgreSQL (Debian's `postgresql` package): a throwaway cluster in $D2L_TEST_SERVERS_DIR
#   - an S3-compatible server: moto's server mode, in a venv of its own ($STATE/moto-venv) so its
#     boto3/botocore never replace the versions the project's s3fs/aiobotocore were resolved with
# Idempotent: servers already up are left alone. Prints the `export ...` lines the tests read
# (D2L_TEST_POSTGRES_URL, D2L_TEST_S3_ENDPOINT) on stdout, or writes them to the file given as $1.
#
#   store/scripts/start_test_servers.sh /tmp/d2l-test-env && . /tmp/d2l-test-env
#   eval "$(store/scripts/start_test_servers.sh)"
#
# Stop them with store/scripts/stop_test_servers.sh.
set -euo pipefail

OUT="${1:-}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
VENV="${VENV:-$([ -d "$ROOT/.venv" ] && echo "$ROOT/.venv" || echo .venv)}"
STATE="${D2L_TEST_SERVERS_DIR:-/tmp/d2l-test-servers}"
PG_PORT="${D2L_TEST_PG_PORT:-54329}"
S3_PORT="${D2L_TEST_S3_PORT:-54330}"
PG_USER=d2l PG_PASSWORD=d2l PG_DB=d2l_test
PGDATA="$STATE/pg/data"
PGSOCK="$STATE/pg/socket"

log() { echo "[start_test_servers] $*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

mkdir -p "$STATE"
chmod 755 "$STATE"

# ---- PostgreSQL -------------------------------------------------------------------------------
pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }
if [ -z "$(pg_bin)" ]; then
    log "installing postgresql (apt)"
    as_root apt-get update -qq >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
fi
PGBIN="$(pg_bin)"
[ -x "$PGBIN/initdb" ] || { log "no initdb found under /usr/lib/postgresql"; exit 1; }

# PostgreSQL refuses to run as root: as root, run it as the `postgres` user the package created.
if [ "$(id -u)" = 0 ]; then
    PG_OWNER=postgres
    as_pg() { runuser -u postgres -- "$@"; }
else
    PG_OWNER="$(id -un)"
    as_pg() { "$@"; }
fi

mkdir -p "$STATE/pg" "$PGSOCK"
chown -R "$PG_OWNER" "$STATE/pg"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    log "initdb $PGDATA"
    as_pg "$PGBIN/initdb" -D "$PGDATA" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
        -E UTF8 --locale=C.UTF-8 >"$STATE/pg/initdb.log" 2>&1 ||
        { cat "$STATE/pg/initdb.log" >&2; exit 1; }
fi
if ! as_pg "$PGBIN/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1; then
    log "starting PostgreSQL on 127.0.0.1:$PG_PORT"
    as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -l "$STATE/pg/server.log" -w -t 60 start \
        -o "-c listen_addresses=127.0.0.1 -c port=$PG_PORT -c unix_socket_directories=$PGSOCK -c max_connections=200" >&2 ||
        { tail -n 30 "$STATE/pg/server.log" >&2; exit 1; }
fi
for _ in $(seq 60); do
    "$PGBIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" && break
    sleep 0.5
done
"$PGBIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" || { log "PostgreSQL does not answer on 127.0.0.1:$PG_PORT"; exit 1; }

psql_admin() { as_pg "$PGBIN/psql" -h "$PGSOCK" -p "$PG_PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -qtA "$@"; }
if [ "$(psql_admin -c "SELECT 1 FROM pg_roles WHERE rolname = '$PG_USER'")" != 1 ]; then
    psql_admin -c "CREATE ROLE $PG_USER LOGIN CREATEDB PASSWORD '$PG_PASSWORD'"
fi
# The tests drop their databases WITH (FORCE), which must also end an autovacuum worker that may
# be visiting the database; without pg_signal_backend a non-superuser's drop fails then.
psql_admin -c "GRANT pg_signal_backend TO $PG_USER" >/dev/null
if [ "$(psql_admin -c "SELECT 1 FROM pg_database WHERE datname = '$PG_DB'")" != 1 ]; then
    psql_admin -c "CREATE DATABASE $PG_DB OWNER $PG_USER"
fi

# ---- S3 (moto server mode) ---------------------------------------------------------------------
[ -x "$VENV/bin/python" ] || { log "no python venv at $VENV (set VENV=...)"; exit 1; }
MOTO_VENV="$STATE/moto-venv"
if [ ! -x "$MOTO_VENV/bin/moto_server" ]; then
    log "installing moto[server] into $MOTO_VENV"
    "$VENV/bin/python" -m venv "$MOTO_VENV"
    "$MOTO_VENV/bin/pip" install -q 'moto[server]' >&2
fi
s3_up() {
    "$VENV/bin/python" - "$S3_PORT" <<'EOF'
import sys, urllib.request
try:
    urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/", timeout=2).read()
except Exception:
    sys.exit(1)
EOF
}
if ! s3_up; then
    log "starting moto S3 server on 127.0.0.1:$S3_PORT"
    setsid nohup "$MOTO_VENV/bin/moto_server" -H 127.0.0.1 -p "$S3_PORT" >"$STATE/moto.log" 2>&1 </dev/null &
    echo $! >"$STATE/moto.pid"
    for _ in $(seq 60); do s3_up && break; sleep 0.5; done
    s3_up || { tail -n 30 "$STATE/moto.log" >&2; log "moto does not answer on 127.0.0.1:$S3_PORT"; exit 1; }
fi

ENV_LINES="export D2L_TEST_POSTGRES_URL=postgresql+psycopg://$PG_USER:$PG_PASSWORD@127.0.0.1:$PG_PORT/$PG_DB
export D2L_TEST_S3_ENDPOINT=http://127.0.0.1:$S3_PORT"
if [ -n "$OUT" ]; then
    printf '%s\n' "$ENV_LINES" >"$OUT"
    log "servers up; environment written to $OUT"
else
    printf '%s\n' "$ENV_LINES"
fi
