#!/usr/bin/env bash
# The whole vault pipeline on this machine, no servers needed: the sandbox (librdkafka's mock
# Kafka cluster + the in-memory CQL stand-in node, test infrastructure), two `vault run`
# processes in one consumer group and `vault api` (the read side), ~100K events from
# `vault produce`, then `vault verify` and a short report with one page of a user's events
# fetched over HTTP. Everything started here is stopped on exit, Ctrl-C or failure.
#
# Environment: DEMO_EVENTS (100000), DEMO_PARTITIONS (12), DEMO_BIN_DIR (default: the release
# directory cargo builds into, asked of `cargo metadata`, so CARGO_TARGET_DIR and
# build.target-dir count; the binaries are built unless DEMO_SKIP_BUILD=1), DEMO_KEEP=1 (after
# the report, keep everything running and print the timeline page's URL and a curl command to
# browse the data, until Ctrl-C; the work dir is kept), DEMO_PID_FILE (each started process id is appended there, so a caller can check
# that none is left).
set -euo pipefail
cd "$(dirname "$0")/.."

EVENTS=${DEMO_EVENTS:-100000}
PARTITIONS=${DEMO_PARTITIONS:-12}
if [ -n "${DEMO_BIN_DIR:-}" ]; then
  BIN=$DEMO_BIN_DIR
else
  BIN="$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')/release"
fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/vault-demo.XXXXXX")
PIDS=()

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
cleanup() {
  local code=$?
  trap - EXIT INT TERM
  # Last started first: the vault processes drain, commit and leave the group while the
  # brokers are still there; the sandbox goes last. A process that does not exit within 30 s
  # of SIGTERM is killed, and the demo fails (as it does when one exits non-zero): a clean
  # shutdown is part of what it shows.
  local i pid
  for ((i=${#PIDS[@]}-1; i>=0; i--)); do
    pid=${PIDS[$i]}
    kill -TERM "$pid" 2>/dev/null || continue
    for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      kill -KILL "$pid" 2>/dev/null || true
      echo "process $pid did not stop within 30 s of SIGTERM; killed" >&2
      [ "$code" -ne 0 ] || code=1
    fi
    local status=0
    wait "$pid" 2>/dev/null || status=$?
    if [ "$status" -ne 0 ] && [ "$code" -eq 0 ]; then
      echo "process $pid exited with status $status after SIGTERM (expected 0)" >&2
      code=1
    fi
  done
  if [ "$code" -ne 0 ]; then
    echo "demo failed (exit $code); logs in $WORK" >&2
  elif [ -z "${DEMO_KEEP:-}" ]; then
    rm -rf "$WORK"
  fi
  exit "$code"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

started() { PIDS+=("$1"); [ -z "${DEMO_PID_FILE:-}" ] || echo "$1" >>"$DEMO_PID_FILE"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local deadline=$((SECONDS + $1)) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || { echo "timed out waiting for $what" >&2; return 1; }
    sleep 0.2
  done
}
ready() { python3 -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://$1/readyz', timeout=2).status == 200 else 1)"; }

if [ -z "${DEMO_SKIP_BUILD:-}" ]; then
  say "Building vault and vault-sandbox (release)"
  cargo build --release -p vault -p vault-sandbox
fi

echo "binaries in $BIN"

say "Starting the sandbox: mock Kafka ($PARTITIONS partitions) + CQL stand-in node (in memory, test infrastructure)"
"$BIN/vault-sandbox" --topic "user-activity:$PARTITIONS" --env-file "$WORK/sandbox.env" >"$WORK/sandbox.out" 2>"$WORK/sandbox.log" &
started $!
wait_for 30 "the sandbox" test -s "$WORK/sandbox.env"
cat "$WORK/sandbox.env"
set -a
# shellcheck disable=SC1091
. "$WORK/sandbox.env"
VAULT_KAFKA_TOPICS=user-activity
VAULT_KAFKA_GROUP_ID=vault-demo
# The mock cluster holds each rebalance for session_timeout - 1s: keep rebalances short.
VAULT_KAFKA_SESSION_TIMEOUT=6s
VAULT_SCYLLA_KEYSPACE=vault
VAULT_SCYLLA_CONSISTENCY=LOCAL_QUORUM
set +a

say "vault migrate"
"$BIN/vault" migrate

say "Starting vault api (the read side) with a read token made for this run"
API=127.0.0.1:$(free_port)
API_TOKEN=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
VAULT_API_ADDR=$API VAULT_API_READ_TOKENS=$API_TOKEN "$BIN/vault" api >"$WORK/vault-api.log" 2>&1 &
started $!
wait_for 60 "vault api to be ready" ready "$API"
echo "ready: http://$API/v1/openapi.json"

say "Starting two vault processes in consumer group vault-demo"
M1=127.0.0.1:$(free_port); M2=127.0.0.1:$(free_port)
VAULT_METRICS_ADDR=$M1 VAULT_KAFKA_INSTANCE_ID=vault-1 "$BIN/vault" run >"$WORK/vault-1.log" 2>&1 &
started $!
VAULT_METRICS_ADDR=$M2 VAULT_KAFKA_INSTANCE_ID=vault-2 "$BIN/vault" run >"$WORK/vault-2.log" 2>&1 &
started $!
wait_for 60 "vault-1 to be ready" ready "$M1"
wait_for 60 "vault-2 to be ready" ready "$M2"
echo "ready: http://$M1/metrics and http://$M2/metrics"

say "Producing $EVENTS events (Zipf-skewed users, 1% duplicates, 0.1% invalid)"
START=$(date +%s.%N)
"$BIN/vault" produce --count "$EVENTS" --users 20000 --skew 0.8 --duplicates 0.01 --invalid 0.001 --record "$WORK/produced.jsonl"

say "Verifying: waiting until committed == produced, then reading every event back"
"$BIN/vault" verify --record "$WORK/produced.jsonl" --wait 5m | tee "$WORK/verify.txt"
END=$(date +%s.%N)

say "Report"
python3 - "$M1" "$M2" "$START" "$END" "$EVENTS" <<'PY'
import re, sys, urllib.request
m1, m2, start, end, events = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
samples = {}
for addr in (m1, m2):
    for line in urllib.request.urlopen(f"http://{addr}/metrics", timeout=5).read().decode().splitlines():
        m = re.match(r'^([a-z_]+)(\{[^}]*\})? ([0-9.eE+-]+)$', line)
        if m:
            key = (m.group(1), m.group(2) or "")
            samples[key] = samples.get(key, 0.0) + float(m.group(3))
def total(name, label=None):
    return sum(v for (n, l), v in samples.items() if n == name and (label is None or label in l))
secs = end - start
stored = total("vault_events_stored_total")
print(f"end to end (produce start -> all committed and verified): {events} messages in {secs:.1f}s = {events/secs:,.0f} events/s")
print(f"event writes acknowledged {stored:,.0f} (re-sent duplicates included), dead-lettered {total('vault_events_dead_lettered_total'):,.0f}, write retries {total('vault_write_retries_total'):,.0f}")
reasons = ", ".join("%s %d" % (r, total("vault_batches_flushed_total", 'reason="%s"' % r)) for r in ("size", "bytes", "linger", "revoke", "shutdown"))
print(f"batches flushed by reason: {reasons}")
buckets = sorted(((float(re.search(r'le="([^"]+)"', l).group(1).replace("+Inf", "inf")), v) for (n, l), v in samples.items() if n == "vault_batch_write_duration_seconds_bucket"))
merged = {}
for le, v in buckets:
    merged[le] = merged.get(le, 0) + v
count = merged.get(float("inf"), 0)
p99 = next((le for le, v in sorted(merged.items()) if count and v >= 0.99 * count), float("nan"))
print(f"batch write latency p99 <= {p99 * 1000:.1f} ms over {count:,.0f} writes")
store_threads = total("vault_runtime_workers", 'runtime="store"')
store_busy = total("vault_runtime_busy_seconds_total", 'runtime="store"')
print(f"store threads (the ScyllaDB driver and the persisters): {store_threads:.0f} over both processes, busy {store_busy:.2f} s")
if store_threads < 2 or store_busy <= 0:
    sys.exit("the ScyllaDB store did not run on its own runtime (scylla.store_threads)")
PY

USER_ID=$(python3 -c "import json,collections,sys; c=collections.Counter(json.loads(l).get('u') for l in open(sys.argv[1])); c.pop(None, None); print(c.most_common(1)[0][0])" "$WORK/produced.jsonl")
say "The read side: vault query --user $USER_ID --limit 5"
"$BIN/vault" query --user "$USER_ID" --limit 5

say "The read API: one page of $USER_ID's events over HTTP (GET /v1/users/$USER_ID/events?limit=5)"
python3 - "$API" "$API_TOKEN" "$USER_ID" <<'PY'
import json, sys, urllib.parse, urllib.request
api, token, user = sys.argv[1:4]
req = urllib.request.Request(
    f"http://{api}/v1/users/{urllib.parse.quote(user, safe='')}/events?limit=5",
    headers={"Authorization": f"Bearer {token}"})
page = json.load(urllib.request.urlopen(req, timeout=10))
for e in page["events"]:
    src = e["source"]
    print(f'{e["occurred_at"]}  {e["event_type"]:<12}  {json.dumps(e["attributes"])[:60]:<60}  {src["topic"]}/{src["partition"]}@{src["offset"]}')
print(f'{len(page["events"])} event(s) over HTTP; next_page_token: {"yes" if page["next_page_token"] else "none (last page)"}')
PY

if [ -n "${DEMO_KEEP:-}" ]; then
  say "Everything keeps running (DEMO_KEEP=1): browse the data, then Ctrl-C to stop everything"
  echo "  timeline page: http://$API/ui/users/$USER_ID"
  echo "                 (sign in with any user name and the password $API_TOKEN)"
  echo "  curl -H 'Authorization: Bearer $API_TOKEN' 'http://$API/v1/users/$USER_ID/events?limit=5'"
  echo "  curl -H 'Authorization: Bearer $API_TOKEN' 'http://$API/v1/users/$USER_ID/export'"
  echo "  vault query against the same data: set -a; . $WORK/sandbox.env; set +a; $BIN/vault query --user $USER_ID"
  trap 'exit 0' INT TERM
  while :; do sleep 1; done
fi
echo "DEMO_KEEP=1 make demo keeps everything running afterwards, to browse the data over HTTP."

say "Stopping everything"
