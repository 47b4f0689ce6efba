#!/usr/bin/env bash
# Installs, builds and runs the comparison peers. Not part of the product.
#
#   benches/peers/run.sh build                 npm install + cargo build --release of each peer
#   benches/peers/run.sh NAME PORT             run one peer in the foreground on 127.0.0.1:PORT
#        NAME: node-ws | tokio-tungstenite | fastwebsockets
#
# Each Rust peer is its own crate (own [workspace], lock file and target dir), so its
# dependencies never touch the stocksync build.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

case "${1:-}" in
  build)
    (cd "$here/node-ws" && npm install --no-audit --no-fund --silent)
    for crate in tokio-tungstenite fastwebsockets; do
      # Its own target dir even when CARGO_TARGET_DIR is set: run below looks for it there.
      (cd "$here/$crate" && CARGO_TARGET_DIR="$here/$crate/target" cargo build --release --quiet)
    done
    ;;
  node-ws)
    exec node "$here/node-ws/server.js" "${2:?port}"
    ;;
  tokio-tungstenite | fastwebsockets)
    exec "$here/$1/target/release/peer-$1" "${2:?port}"
    ;;
  *)
    sed -n '2,9p' "${BASH_SOURCE[0]}" >&2
    exit 2
    ;;
esac
