#!/usr/bin/env bash
# Start a throw-away PostgreSQL server for `rmsprop tune` (several workers sharing one study).
#
# Usage:
#   .ci/postgres.sh [--no-install] [--dir DIR]      start (or reuse) a server, print its URL
#   .ci/postgres.sh --stop [--dir DIR]              stop the server started in DIR
#
# - Installs Debian's `postgresql` with apt-get only when no server binary is found (skipped with
#   --no-install, which exits 3 instead so a caller can decide to skip).
# - Listens on 127.0.0.1 only (no TCP on other interfaces), on a free port, with trust auth for
#   loopback: it is a test server, never a production one. Trust auth accepts any password, so
#   tests can put one in the URL to check that it is never shown.
# - Idempotent: a second call with the same DIR prints the URL of the server already running.
# - The server refuses to run as root, so when called as root the data directory is owned by
#   the `postgres` user and every server command runs through runuser/su.
# stdout carries exactly one line: the SQLAlchemy URL, e.g.
#   postgresql+psycopg2://postgres@127.0.0.1:54321/rmsprop_tune
set -euo pipefail

DIR="${RMSPROP_PG_DIR:-/tmp/rmsprop-pg}"
INSTALL=1
ACTION=start
while [ $# -gt 0 ]; do
  case "$1" in
    --no-install) INSTALL=0 ;;
    --stop) ACTION=stop ;;
    --dir) DIR="$2"; shift ;;
    *) echo "postgres.sh: unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done
DB=rmsprop_tune

find_bindir() {
  local d
  if command -v pg_config >/dev/null 2>&1; then
    d="$(pg_config --bindir 2>/dev/null || true)"
    if [ -n "$d" ] && [ -x "$d/initdb" ]; then echo "$d"; return 0; fi
  fi
  # Debian keeps the server binaries off PATH, one directory per major version: take the newest.
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then echo "$d"; return 0; fi
  done
  if command -v initdb >/dev/null 2>&1; then dirname "$(readlink -f "$(command -v initdb)")"; return 0; fi
  return 1
}

BIN="$(find_bindir || true)"
if [ "$ACTION" = stop ]; then
  [ -n "$BIN" ] && [ -f "$DIR/data/postmaster.pid" ] || exit 0
fi

if [ -z "$BIN" ]; then
  if [ "$INSTALL" = 0 ]; then
    echo "postgres.sh: no PostgreSQL server binaries found (apt-get install postgresql)" >&2
    exit 3
  fi
  echo "postgres.sh: installing Debian's postgresql" >&2
  export DEBIAN_FRONTEND=noninteractive
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq >&2
  $SUDO apt-get install -y -qq postgresql >&2
  BIN="$(find_bindir)"
fi

# Run a server command as the server's owner (root is refused by initdb/postgres).
if [ "$(id -u)" = 0 ]; then
  OWNER=postgres
  id "$OWNER" >/dev/null 2>&1 || useradd --system --no-create-home "$OWNER"
  as_owner() {
    if command -v runuser >/dev/null 2>&1; then runuser -u "$OWNER" -- "$@"
    else su -s /bin/sh "$OWNER" -c "$(printf '%q ' "$@")"; fi
  }
else
  OWNER="$(id -un)"
  as_owner() { "$@"; }
fi

if [ "$ACTION" = stop ]; then
  as_owner "$BIN/pg_ctl" -D "$DIR/data" -m fast -w stop >/dev/null 2>&1 || true
  exit 0
fi

mkdir -p "$DIR"
chmod 755 "$DIR"
[ "$(id -u)" = 0 ] && chown "$OWNER" "$DIR"

if [ -f "$DIR/port" ] && as_owner "$BIN/pg_ctl" -D "$DIR/data" status >/dev/null 2>&1; then
  PORT="$(cat "$DIR/port")"
else
  if [ ! -f "$DIR/data/PG_VERSION" ]; then
    rm -rf "$DIR/data"
    # --no-sync, fsync=off: a throw-away test server; durability would only cost time.
    as_owner "$BIN/initdb" -D "$DIR/data" -U postgres --auth=trust --encoding=UTF8 --no-sync \
      --no-locale >"$DIR/initdb.log" 2>&1 || { cat "$DIR/initdb.log" >&2; exit 1; }
  fi
  PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  # The unix socket goes into DIR: /var/run/postgresql may not exist or be writable.
  as_owner "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $PORT -k $DIR -c max_connections=100 -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
    start >/dev/null || { cat "$DIR/server.log" >&2; exit 1; }
  echo "$PORT" | as_owner tee "$DIR/port" >/dev/null
fi

if ! as_owner "$BIN/psql" -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -tAc \
    "SELECT 1 FROM pg_database WHERE datname='$DB'" | grep -q 1; then
  as_owner "$BIN/createdb" -h 127.0.0.1 -p "$PORT" -U postgres "$DB" 2>/dev/null || true
fi
echo "postgresql+psycopg2://postgres@127.0.0.1:$PORT/$DB"
