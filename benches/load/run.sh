#!/usr/bin/env bash
# Load figures for BENCHMARKS.md: a release `dev` appliance (SoftHSM2, or
# with BACKEND=tpm an swtpm; TLS; LMDB) in a temp dir, bound like Token Vault
# does, then wrk at 64 connections. Every signed request carries its own
# pre-signed, single-use request id.
# STORE=postgres: the store in a throwaway PostgreSQL cluster on this box
# (.ci/pg-cluster, TLS, fsync on); NODES=2 with it: a second node
# (`dev --join`) on the same database and token, the load split between the
# two (half the connections each; CPU is both nodes').
# Usage: [BACKEND=pkcs11|tpm] [STORE=lmdb|postgres] [NODES=1|2] benches/load/run.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${1:-10}
backend=${BACKEND:-pkcs11}
.ci/install-deps
command -v wrk >/dev/null || { sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo; $sudo apt-get install -y -qq wrk >/dev/null; }
cargo build --release --quiet
bin=target/release/tokenvault-webhook
dir=$(mktemp -d)
port=${PORT:-18555}
wait_ready() { for _ in $(seq 100); do grep -q READY "$dir/log" 2>/dev/null && break; sleep 0.1; done; grep -q READY "$dir/log" || { cat "$dir/log"; exit 1; }; }
store=${STORE:-lmdb}
nodes=${NODES:-1}
pg_args=()
if [ "$store" = postgres ]; then
  .ci/pg-cluster init "$dir/pg" $((port + 100)) >/dev/null
  .ci/pg-cluster start "$dir/pg"
  pg_args=(--postgres "$(cat "$dir/pg/url")" --postgres-ca "$dir/pg/ca.pem" --postgres-password-file "$dir/pg/password")
fi
# Provision with `dev`, then run it again on the same dir with the
# per-address rate limit off: all load comes from 127.0.0.1.
$bin dev --dir "$dir/a" --backend "$backend" --listen 127.0.0.1:$port "${pg_args[@]}" 2>"$dir/log" &
pid=$!
pid_b=""
trap 'kill $pid $pid_b 2>/dev/null; wait $pid $pid_b 2>/dev/null; [ "$store" = postgres ] && .ci/pg-cluster kill "$dir/pg"; rm -rf "$dir"' EXIT
wait_ready
kill $pid; wait $pid 2>/dev/null || true
rm "$dir/log"
printf '\n[direct_access]\nrate_limit_per_minute = 0\n' >> "$dir/a/config.toml"
# Start to READY: `serve` on the provisioned dir (the production path); the
# TPM backend through `dev`, which also starts its swtpm.
if [ "$backend" = tpm ]; then
  python3 benches/load/start.py 20 $bin dev --dir "$dir/a" --listen 127.0.0.1:0
else
  python3 benches/load/start.py 20 $bin --config "$dir/a/config.toml" serve
fi
$bin dev --dir "$dir/a" --listen 127.0.0.1:$port 2>"$dir/log" &
pid=$!
wait_ready
base=https://127.0.0.1:$port
base_b=""
if [ "$nodes" = 2 ]; then
  [ "$store" = postgres ] || { echo "NODES=2 needs STORE=postgres" >&2; exit 1; }
  $bin dev --dir "$dir/b" --listen 127.0.0.1:$((port + 1)) --join "$dir/a" 2>"$dir/log-b" &
  pid_b=$!
  for _ in $(seq 100); do grep -q READY "$dir/log-b" 2>/dev/null && break; sleep 0.1; done
  grep -q READY "$dir/log-b" || { cat "$dir/log-b"; exit 1; }
  base_b=https://127.0.0.1:$((port + 1))
fi
echo "backend: $backend, store: $store, nodes: $nodes"
code=$($bin --config "$dir/a/config.toml" register-url | python3 -c 'import json,sys;print(json.load(sys.stdin)["code"])')
secret=$(curl -s --cacert "$dir/a/tls/cert.pem" "$base/v1/exchange" -d "{\"code\":\"$code\"}" | python3 -c 'import json,sys;print(json.load(sys.stdin)["hmacSecret"])')
gen() { python3 benches/load/gen_signed.py "$secret" "$1" "$2" "$3" "$4"; }
ticks() { cat "/proc/$pid/stat" ${pid_b:+"/proc/$pid_b/stat"} | awk '{t += $14 + $15} END {print t}'; }
# wrk, or with NODES=2 two wrks in parallel, one per node, each with half
# the connections and every other line of a request file (WRK_ID_BASE).
load() { # wrk's arguments, the URL last
  if [ -z "$base_b" ]; then wrk "$@"; return; fi
  local args=("$@") url=${!#}
  unset 'args[${#args[@]}-1]'
  local half=() a
  for a in "${args[@]}"; do case "$a" in -t2) half+=(-t1) ;; -c64) half+=(-c32) ;; *) half+=("$a") ;; esac; done
  WRK_ID_BASE=0 wrk "${half[@]}" "$url" > "$dir/wrk-a" 2>&1 &
  local wa=$!
  WRK_ID_BASE=1 wrk "${half[@]}" "${url/$base/$base_b}" > "$dir/wrk-b" 2>&1
  wait $wa
  cat "$dir/wrk-a" "$dir/wrk-b"
}
hz=$(getconf CLK_TCK)
# PROFILE=word: `perf record` the server during the rows whose name holds
# word; the flat profile goes to perf-<row>.txt in the current directory.
measure() { # name, command...: sets $out and $cpu (server CPU, % of one core)
  local name=$1 t0 t1 perf_pid=""
  shift
  if [ -n "${PROFILE:-}" ] && [[ "$name" == *"$PROFILE"* ]] && command -v perf >/dev/null; then
    perf record -F 999 -p "$pid" -o "$dir/perf.data" -- sleep $((secs > 3 ? secs - 2 : 1)) 2>/dev/null >/dev/null &
    perf_pid=$!
  fi
  t0=$(ticks)
  out=$("$@" 2>&1)
  t1=$(ticks)
  cpu=$(( (t1 - t0) * 100 / hz / secs ))
  if [ -n "$perf_pid" ]; then
    wait "$perf_pid" || true
    local f
    f="perf-$(tr -c 'a-zA-Z0-9' '-' <<<"$name" | tr -s '-' | sed 's/-$//').txt"
    { echo "## by object"
      perf report -i "$dir/perf.data" --no-children --sort dso --stdio 2>/dev/null | grep -E '^ +[0-9]' | head -12 || true
      echo "## by symbol"
      perf report -i "$dir/perf.data" --no-children --sort dso,symbol --stdio 2>/dev/null | grep -E '^ +[0-9]' | head -40 | cut -c1-150 | sed 's/ *$//' || true
    } > "$f"
  fi
}
report() { # name (wrk output in $out, server CPU in $cpu)
  local rps p50 p99 errs
  # Two nodes: the sum of both wrks' rates and errors; latencies of the first.
  rps=$(grep Requests/sec <<<"$out" | awk '{t += $2} END {printf "%.2f", t}')
  p50=$(grep " 50%" <<<"$out" | awk '{print $2}' | head -1)
  p99=$(grep " 99%" <<<"$out" | awk '{print $2}' | head -1)
  errs=$( (grep -oE "non2xx=[0-9]+" <<<"$out" || echo non2xx=0) | cut -d= -f2 | awk '{t += $1} END {print t}')
  printf "| %-42s | %9s | %8s | %8s | %6s | %5s %% | %6s MiB | %6s MiB |\n" "$1" "$rps" "$p50" "$p99" "${errs:-0}" "$cpu" \
    "$(( $(grep VmHWM /proc/$pid/status | awk '{print $2}') / 1024 ))" "$(( $(grep RssAnon /proc/$pid/status | awk '{print $2}') / 1024 ))"
}
# ONLY=regex: run the floor and the rows whose name matches (e.g. 'store|rotate').
want() { [ -z "${ONLY:-}" ] || [[ "$1" =~ $ONLY ]]; }
signed() { # name, path, n, body
  want "$1" || return 0
  gen "$2" "$4" "$3" "$dir/reqs"
  REQS="$dir/reqs" PATH_="$2" WRK_THREADS=2 measure "$1" load -t2 -c64 -d${secs}s --latency -s benches/load/signed.lua "$base"
  report "$1"
}
# peak RSS (VmHWM) includes LMDB's memory-mapped file pages, which grow with
# the data written; anon RSS (RssAnon, at the end of the row) is the heap.
echo "| endpoint (64 connections, ${secs}s) | req/s | p50 | p99 | errors | server CPU | peak RSS | anon RSS |"
echo "|---|---|---|---|---|---|---|---|"
measure "GET /v1/health (floor)" load -t2 -c64 -d${secs}s --latency "$base/v1/health"
report "GET /v1/health (floor)"
signed "POST /v1/health (HMAC + replay)" /v1/health $((secs * 25000)) '{"requestId":"req_bench"}'
gen /v1/storage '{"operation":"set","collection":"tokens","key":"svc-{i}","data":{"meta":{"tokenType":"JWT","createdAt":"2026-02-01T10:00:00Z","displayName":"Service {i}"}}}' 200 "$dir/set"
PATH_=/v1/storage python3 benches/load/send.py "$base" "$dir/a/tls/cert.pem" "$dir/set"
signed "POST /v1/storage list 200 tokens" /v1/storage $((secs * 6000)) '{"operation":"list","collection":"tokens","options":{"limit":200}}'
signed "POST /v1/storage set (durable)" /v1/storage $((secs * 12000)) '{"operation":"set","collection":"proxy_configs","key":"p-{i}","data":{"name":"x","serviceName":"github"}}'
direct() { # name, kind, n
  want "$1" || return 0
  python3 benches/load/gen_direct.py "$secret" "$2" "$3" "$dir/direct"
  REQS="$dir/direct" WRK_THREADS=2 measure "$1" load -t2 -c64 -d${secs}s --latency -s benches/load/direct.lua "$base"
  report "$1"
}
direct "POST /v1/store (durable, sealed)" store $((secs * 15000))
direct "GET /v1/credential (ticket + decrypt)" credential $((secs * 25000))
python3 benches/load/gen_direct.py "$secret" totp-store 200 "$dir/totp-enrol" 200
python3 benches/load/send.py "$base" "$dir/a/tls/cert.pem" "$dir/totp-enrol"
direct "GET /v1/totp-code" totp $((secs * 20000))
# rotate-key over ROTATE_DOCS (20000) more sealed documents plus those the
# rows above stored, the service running (idle): wall time, documents/s.
if want "rotate-key"; then
  docs=${ROTATE_DOCS:-20000}
  python3 benches/load/gen_direct.py "$secret" store "$docs" "$dir/seed" "$docs"
  seeded=$(REQS="$dir/seed" WRK_THREADS=2 wrk -t2 -c64 -d$((docs / 2000 + 5))s -s benches/load/direct.lua "$base")
  seed_errors=$( (grep -oE "non2xx=[0-9]+" <<<"$seeded" || echo non2xx=0) | cut -d= -f2 | head -1)
  cfg="$dir/a/config.toml"
  # Sealed documents only (a meta-only one, e.g. from a store wrk cut off
  # when it stopped, has nothing to re-seal).
  n=$($bin --config "$cfg" rotate-key --status | python3 -c 'import json,sys;print(sum(v for k,v in json.load(sys.stdin)["documentsByGeneration"].items() if k != "unsealed"))')
  t0=$(date +%s%N)
  $bin --config "$cfg" rotate-key >"$dir/rotate.json" 2>"$dir/rotate.log" || { cat "$dir/rotate.log"; exit 1; }
  t1=$(date +%s%N)
  echo "after: $($bin --config "$cfg" rotate-key --status | python3 -c 'import json,sys;d=json.load(sys.stdin);print("documents by generation", d["documentsByGeneration"], "device", d["deviceGenerations"])')"
  moved=$(python3 -c 'import json,sys;print(json.load(open(sys.argv[1]))["documents"])' "$dir/rotate.json")
  awk -v n="$n" -v m="$moved" -v e="$seed_errors" -v ns=$((t1 - t0)) 'BEGIN { printf "rotate-key: %d sealed documents (%d re-sealed; %d seeding stores failed) in %.2f s: %.0f documents/s, service running\n", n, m, e, ns / 1e9, m / (ns / 1e9) }'
fi
