# Starts a throwaway PostgreSQL server for the registry tests and benchmark.
#
#   source .ci/postgres.sh      # installs postgresql if missing, starts it,
#                               # exports GM_TEST_POSTGRES_URL
#   gm_pg_stop                  # stops it and removes its files (also on exit)
#
# The cluster lives in a temp dir, listens on 127.0.0.1 on a free port
# (plus a socket in its dir), and has one password-protected user `gm` and
# one database `gm_test`. PostgreSQL refuses to run as root, so as root it
# runs as the `postgres` user (created by Debian's package).
#
# GM_PG_DURABLE=1 keeps fsync on (for benchmarks); by default the cluster
# runs with fsync off, which only makes throwaway test data faster to write.

gm_pg_bin_dir() {
  local dir
  if command -v pg_ctl >/dev/null 2>&1 && command -v initdb >/dev/null 2>&1; then
    dir="$(dirname "$(readlink -f "$(command -v pg_ctl)")")"
    echo "$dir"
    return 0
  fi
  dir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
  if [ -n "$dir" ] && [ -x "$dir/pg_ctl" ] && [ -x "$dir/initdb" ]; then
    echo "$dir"
    return 0
  fi
  return 1
}

gm_pg_install() {
  echo "postgres.sh: installing PostgreSQL from Debian's packages" >&2
  # Debian's package creates and starts a "main" cluster by default; we
  # start our own, so ask it not to (a drop-in its createcluster.conf reads).
  mkdir -p /etc/postgresql-common/createcluster.d
  echo "create_main_cluster = false" >/etc/postgresql-common/createcluster.d/gm-no-main-cluster.conf
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null
}

# Runs a command as the cluster's owner.
gm_pg_as_owner() {
  if [ "$(id -u)" = 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

gm_pg_port_free() {
  ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

gm_pg_start() {
  local bin
  if ! bin="$(gm_pg_bin_dir)"; then
    gm_pg_install
    bin="$(gm_pg_bin_dir)" || { echo "postgres.sh: no pg_ctl/initdb after installing postgresql" >&2; return 1; }
  fi
  if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
    useradd --system --home-dir /var/lib/postgresql --shell /bin/sh postgres
  fi

  GM_PG_DIR="$(mktemp -d /tmp/gm-pg.XXXXXX)"
  local password
  password="$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
  printf '%s\n' "$password" >"$GM_PG_DIR/pwfile"
  chmod 700 "$GM_PG_DIR"
  chmod 600 "$GM_PG_DIR/pwfile"
  if [ "$(id -u)" = 0 ]; then
    chown -R postgres: "$GM_PG_DIR"
  fi
  gm_pg_as_owner "$bin/initdb" -D "$GM_PG_DIR/data" -U gm --pwfile="$GM_PG_DIR/pwfile" \
    --auth=scram-sha-256 -E UTF8 --locale=C.UTF-8 --no-sync >"$GM_PG_DIR/initdb.log" 2>&1 \
    || { cat "$GM_PG_DIR/initdb.log" >&2; return 1; }
  rm -f "$GM_PG_DIR/pwfile"

  local settings="-c listen_addresses=127.0.0.1 -k $GM_PG_DIR"
  if [ "${GM_PG_DURABLE:-0}" != 1 ]; then
    settings="$settings -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
  fi
  local attempt port started=0
  for attempt in 1 2 3 4 5 6 7 8; do
    port=$((20000 + RANDOM % 40000))
    gm_pg_port_free "$port" || continue
    if gm_pg_as_owner "$bin/pg_ctl" -D "$GM_PG_DIR/data" -l "$GM_PG_DIR/server.log" -w -t 60 \
      -o "$settings -p $port" start >/dev/null; then
      started=1
      break
    fi
  done
  if [ "$started" != 1 ]; then
    echo "postgres.sh: the server did not start; its log:" >&2
    cat "$GM_PG_DIR/server.log" >&2
    return 1
  fi
  GM_PG_BIN="$bin"
  GM_PG_PORT="$port"
  PGPASSWORD="$password" "$bin/psql" -q -h 127.0.0.1 -p "$port" -U gm -d postgres \
    -c "CREATE DATABASE gm_test" >/dev/null || return 1
  export GM_TEST_POSTGRES_URL="postgres://gm:$password@127.0.0.1:$port/gm_test"
  echo "postgres.sh: PostgreSQL $("$bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$port (data in $GM_PG_DIR)" >&2
}

gm_pg_stop() {
  if [ -n "${GM_PG_DIR:-}" ] && [ -d "$GM_PG_DIR/data" ]; then
    gm_pg_as_owner "$GM_PG_BIN/pg_ctl" -D "$GM_PG_DIR/data" -m fast -w stop >/dev/null 2>&1 || true
  fi
  if [ -n "${GM_PG_DIR:-}" ]; then
    rm -rf "$GM_PG_DIR"
  fi
  GM_PG_DIR=""
  unset GM_TEST_POSTGRES_URL
}

gm_pg_start
trap gm_pg_stop EXIT
