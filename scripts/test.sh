#!/usr/bin/env bash
# The whole test suite: every test against the embedded engine, then the protocol suites again
# against the Redis engine. The tests use real peers (redis-server, Debian's chromium, node with
# the npm dev dependencies, Python's kosoku and websockets, nginx, php-cli with php-curl); what is
# missing is installed here when we are root (as in CI), and otherwise the tests that need it
# fail with a message saying what to install.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v npm >/dev/null || missing+=(nodejs npm)
# tests/nginx.rs (stocksync behind nginx) and tests/php_example.rs (examples/php with php-curl).
[ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v php >/dev/null || missing+=(php-cli)
{ command -v php >/dev/null && php -m 2>/dev/null | grep -qx curl; } || missing+=(php-curl)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ]; then
        apt-get update
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
    else
        echo "missing test peers: ${missing[*]} (sudo apt-get install ${missing[*]})" >&2
    fi
fi
if command -v npm >/dev/null && [ ! -d node_modules ]; then
    npm ci --no-audit --no-fund
fi
# Real Python clients: the Autobahn driver (kosoku) and websockets, which offers
# permessage-deflate by default (tests/autobahn.rs, tests/ws_deflate.rs).
if [ ! -x .venv-autobahn/bin/python ]; then
    python3 -m venv .venv-autobahn || {
        [ "$(id -u)" -eq 0 ] && apt-get update && apt-get install -y python3-venv &&
            python3 -m venv .venv-autobahn
    }
fi
if ! .venv-autobahn/bin/python -c 'import kosoku, websockets' 2>/dev/null; then
    .venv-autobahn/bin/pip install --quiet --disable-pip-version-check kosoku websockets
fi
# The HTTP API against its OpenAPI description (docs/openapi.yaml), by schemathesis: every
# response matches the schema, no 500, no crash. `positive_data_acceptance` is left out: whether
# a schema-valid op is accepted depends on stock rules the schema does not model (a `set` needs
# `quantity`, a `decrease` needs stock), so the server rightly refuses some of them.
if [ ! -x .venv-schemathesis/bin/st ]; then
    python3 -m venv .venv-schemathesis
    .venv-schemathesis/bin/pip install --quiet --disable-pip-version-check schemathesis
fi
cargo build --bin stocksync
st_out=$(mktemp)
"${CARGO_TARGET_DIR:-target}/debug/stocksync" --listen 127.0.0.1:0 --data-dir none \
    --write-token schemathesis-token >"$st_out" 2>/dev/null &
st_pid=$!
trap 'kill "$st_pid" 2>/dev/null || true; rm -f "$st_out"' EXIT
for _ in $(seq 50); do grep -q listening "$st_out" && break; sleep 0.1; done
st_addr=$(sed -n 's/^stocksync: listening on //p' "$st_out")
.venv-schemathesis/bin/st run docs/openapi.yaml --url "http://$st_addr" --checks all \
    --exclude-checks positive_data_acceptance -H "Authorization: Bearer schemathesis-token" \
    --max-examples 100
kill "$st_pid" 2>/dev/null || true
# Then every Rust test (the last lines are cargo's, the runner CI reads), and the protocol
# suites again against Redis.
cargo test --workspace
# The protocol suites again, with every memory-only test server on a Redis of its own (the
# embedded-only suites, wal_* and the in-process ones, stay out).
STOCKSYNC_TEST_ENGINE=redis cargo test --test stock_ws --test stock_errors \
    --test stock_concurrency --test stock_model --test http_api --test access --test limits \
    --test ordering --test slow_consumer --test metrics --test shutdown --test smoke \
    --test snapshot_chunks --test server_limits --test strict_edge --test holds
