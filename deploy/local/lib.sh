# Shared functions of deploy/local/{up,down,demo,test}. Sourced, not run.
#
# Everything the scripts start is recorded as a pid file under $STATE/run; `down` stops
# exactly those processes. Data and logs stay under $STATE (default: .local/ in the repo).
# Readiness is always a real check (ClickHouse /ping, a TCP connect to the broker,
# Prometheus /-/ready, our /readyz), polled with a deadline; never a fixed sleep.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
STATE=${LOCAL_STATE_DIR:-$ROOT/.local}
RUN=$STATE/run
LOGS=$STATE/logs

KAFKA_PORT=${LOCAL_KAFKA_PORT:-9092}
CH_HTTP_PORT=${LOCAL_CLICKHOUSE_HTTP_PORT:-8123}
CH_TCP_PORT=${LOCAL_CLICKHOUSE_TCP_PORT:-9000}
PROM_PORT=${LOCAL_PROMETHEUS_PORT:-9090}
REDIS_PORT=${LOCAL_REDIS_PORT:-6379}
INGEST_PORT=${LOCAL_INGEST_PORT:-8080}
CONSUMER_PORT=${LOCAL_CONSUMER_PORT:-9101}
WEBDRIVER_PORT=${LOCAL_WEBDRIVER_PORT:-9515}
TANSU_VERSION=0.6.0
# ClickHouse 26.9 engine from PyPI (see deploy/local/clickhouse/serve.py); pinned. Its
# virtual environment (~890 MB) is a per-user cache shared by every clone of the repository,
# named after the version, so a fresh clone does not install it again.
CHDB_VERSION=26.9.0
CHDB_VENV=${LOCAL_CHDB_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/referral-pipeline/chdb-venv-$CHDB_VERSION}

KAFKA_BOOTSTRAP=127.0.0.1:$KAFKA_PORT
CLICKHOUSE_URL=http://127.0.0.1:$CH_HTTP_PORT
REDIS_URL=redis://127.0.0.1:$REDIS_PORT
WEBDRIVER_URL=http://127.0.0.1:$WEBDRIVER_PORT

log() { printf '\033[1m[local]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[31m[local] error:\033[0m %s\n' "$*" >&2; exit 1; }

# --- installs (idempotent, fast when already there) -------------------------------------

APT_UPDATED=
apt_install() {
  # $1: a command that shows the package is there; the rest: package names.
  local probe=$1; shift
  command -v "$probe" >/dev/null 2>&1 && return 0
  apt_install_pkgs "$@"
}

apt_install_pkgs() {
  command -v apt-get >/dev/null 2>&1 || die "apt-get is not available: install $* by hand"
  local sudo=
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  if [ -z "$APT_UPDATED" ]; then
    log "apt-get update"
    $sudo apt-get update -qq >/dev/null
    APT_UPDATED=1
  fi
  log "installing $* (Debian packages)"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

tansu_bin() {
  if [ -n "${TANSU_BIN:-}" ]; then echo "$TANSU_BIN"; return; fi
  if command -v tansu >/dev/null 2>&1; then command -v tansu; return; fi
  echo "${CARGO_HOME:-$HOME/.cargo}/bin/tansu"
}

install_tansu() {
  local bin
  bin=$(tansu_bin)
  [ -x "$bin" ] && return 0
  command -v cargo >/dev/null 2>&1 || die "cargo is needed to install the tansu broker"
  # The default build has no storage engine; sqlite (libsql) gives a durable broker.
  log "installing tansu $TANSU_VERSION from crates.io (about 9 minutes on 2 cores, once)"
  cargo install tansu --version "$TANSU_VERSION" --locked --features libsql,dynostore --quiet
}

# ClickHouse 26.9: chdb-core in a virtual environment in the user's cache (~890 MB, ~45 s once).
install_clickhouse() {
  local have
  have=$("$CHDB_VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("chdb-core"))' 2>/dev/null || true)
  [ "$have" = "$CHDB_VERSION" ] && return 0
  command -v python3 >/dev/null 2>&1 || die "python3 is needed to run ClickHouse (chdb-core)"
  log "installing ClickHouse $CHDB_VERSION (PyPI chdb-core) into $CHDB_VENV (about 45 s, once)"
  mkdir -p "$(dirname "$CHDB_VENV")"
  [ -x "$CHDB_VENV/bin/python" ] || python3 -m venv "$CHDB_VENV" \
    || { apt_install_pkgs python3-venv && python3 -m venv "$CHDB_VENV"; } \
    || die "could not create a Python virtual environment in $CHDB_VENV"
  "$CHDB_VENV/bin/python" -m pip install --quiet --disable-pip-version-check "chdb-core==$CHDB_VERSION"
}

install_services() {
  apt_install curl curl ca-certificates
  install_clickhouse
  apt_install prometheus prometheus
  # Shared plan-limit counters of the ingest instances.
  apt_install redis-server redis-server
  install_tansu
}

# --- processes -------------------------------------------------------------------------

pid_alive() { [ -f "$RUN/$1.pid" ] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null; }

# port_free NAME PORT: dies when PORT is taken by a process that is not our NAME.
port_free() {
  if ! pid_alive "$1" && tcp_open 127.0.0.1 "$2"; then
    die "port $2 is in use by another process: stop it, or move $1 with LOCAL_*_PORT (see deploy/local/lib.sh)"
  fi
}

# start NAME WORKDIR CMD... : starts CMD in the background unless NAME already runs.
start() {
  local name=$1 dir=$2; shift 2
  mkdir -p "$RUN" "$LOGS"
  if pid_alive "$name"; then
    log "$name already running (pid $(cat "$RUN/$name.pid"))"
    return 0
  fi
  (cd "$dir" && exec setsid "$@" >>"$LOGS/$name.log" 2>&1 </dev/null) &
  echo $! >"$RUN/$name.pid"
  log "started $name (pid $!, log $LOGS/$name.log)"
}

# wait_until NAME SECONDS CHECK... : polls CHECK until it succeeds or the deadline passes.
wait_until() {
  local name=$1 secs=$2; shift 2
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    if [ -f "$RUN/$name.pid" ] && ! pid_alive "$name"; then
      tail -n 30 "$LOGS/$name.log" >&2 || true
      die "$name exited during start-up (log: $LOGS/$name.log)"
    fi
    [ $SECONDS -lt $deadline ] || { tail -n 30 "$LOGS/$name.log" >&2 || true; die "$name not ready after ${secs}s"; }
    sleep 0.1
  done
}

tcp_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }
http_ok() { curl -fsS -o /dev/null --max-time 2 "$1"; }

# stop NAME: SIGTERM, wait up to 60 s for a clean exit, then SIGKILL.
stop() {
  local name=$1
  [ -f "$RUN/$name.pid" ] || return 0
  local pid
  pid=$(cat "$RUN/$name.pid")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + 60))
    while kill -0 "$pid" 2>/dev/null; do
      if [ $SECONDS -ge $deadline ]; then
        log "$name did not stop in 60 s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        break
      fi
      sleep 0.1
    done
    log "stopped $name"
  fi
  rm -f "$RUN/$name.pid"
}

# --- services --------------------------------------------------------------------------

start_broker() {
  mkdir -p "$STATE/tansu"
  port_free broker "$KAFKA_PORT"
  # The sqlite path is relative to the working directory: data survives restarts.
  start broker "$STATE/tansu" "$(tansu_bin)" broker \
    --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --storage-engine "sqlite://tansu.db"
  wait_until broker 30 tcp_open 127.0.0.1 "$KAFKA_PORT"
}

start_clickhouse() {
  local dir=$STATE/clickhouse
  mkdir -p "$dir/data" "$dir/tmp" "$dir/user_files" "$dir/format_schemas" "$dir/log"
  sed -e "s#@STATE@#$dir#g" -e "s#@HTTP_PORT@#$CH_HTTP_PORT#g" -e "s#@TCP_PORT@#$CH_TCP_PORT#g" \
    "$ROOT/deploy/local/clickhouse/config.xml.in" >"$dir/config.xml"
  cp "$ROOT/deploy/local/clickhouse/users.xml" "$dir/users.xml"
  port_free clickhouse "$CH_HTTP_PORT"
  TZ=UTC start clickhouse "$dir" "$CHDB_VENV/bin/python" "$ROOT/deploy/local/clickhouse/serve.py" "$dir"
  wait_until clickhouse 60 http_ok "$CLICKHOUSE_URL/ping"
}

start_prometheus() {
  local dir=$STATE/prometheus
  mkdir -p "$dir/data"
  sed -e "s#127.0.0.1:8080#127.0.0.1:$INGEST_PORT#; s#127.0.0.1:9101#127.0.0.1:$CONSUMER_PORT#" \
    "$ROOT/deploy/prometheus/prometheus.local.yml" >"$dir/prometheus.yml"
  cp "$ROOT/deploy/prometheus/alerts.yml" "$dir/alerts.yml"
  port_free prometheus "$PROM_PORT"
  start prometheus "$dir" prometheus --config.file="$dir/prometheus.yml" \
    --storage.tsdb.path="$dir/data" --web.listen-address="127.0.0.1:$PROM_PORT" \
    --web.enable-lifecycle
  wait_until prometheus 60 http_ok "http://127.0.0.1:$PROM_PORT/-/ready"
}

redis_ping() { [ "$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ]; }

start_redis() {
  local dir=$STATE/redis
  mkdir -p "$dir"
  port_free redis "$REDIS_PORT"
  # Append-only file: the day and month counters of the plan limits survive a restart.
  start redis "$dir" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$dir" \
    --appendonly yes --save '' --daemonize no --protected-mode yes
  wait_until redis 30 redis_ping
}

# Headless Chromium and its WebDriver server, for the browser script's tests only.
install_browser() {
  apt_install chromium chromium
  apt_install chromedriver chromium-driver
}

start_webdriver() {
  port_free chromedriver "$WEBDRIVER_PORT"
  mkdir -p "$STATE"
  start chromedriver "$STATE" chromedriver --port="$WEBDRIVER_PORT" --allowed-ips=127.0.0.1
  wait_until chromedriver 30 http_ok "$WEBDRIVER_URL/status"
}

start_backing_services() {
  start_broker
  start_clickhouse
  start_redis
  start_prometheus
}

stop_backing_services() {
  stop chromedriver
  stop prometheus
  stop redis
  stop clickhouse
  stop broker
}

# The hash key of the local stack: random, made once, never printed.
hash_key() {
  local f=$STATE/hash_key
  if [ ! -s "$f" ]; then
    mkdir -p "$STATE"
    (umask 077 && head -c 48 /dev/urandom | base64 | tr -d '\n' >"$f")
  fi
  cat "$f"
}
