#!/usr/bin/env bash
# One command for examples/orders-servicebus against a local RabbitMQ with its AMQP 1.0 plugin:
# builds lambda-ctl and the shop publisher, serves a copy of this project, publishes orders and
# late corrections over AMQP 1.0, waits until every order is counted, and prints the views.
# Env: SERVICEBUS_URL [amqp://guest:guest@127.0.0.1:5672], ORDERS [200].
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here/../.."
url="${SERVICEBUS_URL:-amqp://guest:guest@127.0.0.1:5672}"
orders="${ORDERS:-200}"
queue="orders-example-$$"
cargo build --quiet --bin lambda-ctl --example orders-servicebus-publish
bin="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/debug"

project="$(mktemp -d)"
cp -r "$here/pipelines" "$project/"
export SERVICEBUS_URL="$url" SERVICEBUS_QUEUE="/amq/queue/$queue"
"$bin/lambda-ctl" validate --project "$project"
# Declare the queue and publish before serving: the queue levels the load.
"$bin/examples/orders-servicebus-publish" "$url" "$queue" "$orders"

log="$project/serve.out"
"$bin/lambda-ctl" serve --project "$project" --listen 127.0.0.1:0 >"$log" &
serve=$!
trap 'kill $serve 2>/dev/null; wait $serve 2>/dev/null; rm -rf "$project"' EXIT
for _ in $(seq 1 100); do
    base="$(sed -n 's/^lambda-ctl serving on //p' "$log")"
    [ -n "$base" ] && break
    sleep 0.1
done
[ -n "$base" ] || { echo "serve did not start" >&2; exit 1; }

# Every order and correction counted once: orders + ceil(orders/10) messages, the duplicate
# dropped.
want=$((orders + (orders + 9) / 10))
for _ in $(seq 1 300); do
    got="$(curl -s "$base/v1/views/orders/by_payment" | python3 -c 'import json,sys; print(sum(r["messages"] for r in json.load(sys.stdin)["rows"]))')"
    [ "$got" = "$want" ] && break
    sleep 0.1
done
echo "counted $got of $want messages"
curl -s "$base/v1/views/orders/revenue_per_minute" | python3 -m json.tool
curl -s "$base/v1/views/orders/by_payment" | python3 -m json.tool
[ "$got" = "$want" ]
