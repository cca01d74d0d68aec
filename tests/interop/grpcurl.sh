#!/usr/bin/env bash
# grpcurl checks of a running changetoken server, through server reflection only.
# The server at $CHANGETOKEN_ENDPOINT (host:port, plaintext) runs with a short
# --propagation-delay, so a submitted change is INSYNC well within the 10 s any call may
# take. Exits non-zero with a message on the first failed check; prints `grpcurl: ok`.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
grpcurl="${GRPCURL:-$root/target/tools/venv/bin/grpcurl}"
endpoint="${CHANGETOKEN_ENDPOINT:?set CHANGETOKEN_ENDPOINT to host:port}"
svc=changetoken.v1.ChangeTokenService
uuid_v4='^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$'

fail() {
  echo "grpcurl: FAIL: $*" >&2
  exit 1
}
# meta ARGS...: a reflection query, `list` or `describe SYMBOL`.
meta() { timeout 10 "$grpcurl" -plaintext "$endpoint" "$@" 2>&1; }
# rpc METHOD JSON: one call; a server stream is read to its end.
rpc() { timeout 10 "$grpcurl" -plaintext -d "$2" "$endpoint" "$1" 2>&1; }
# field NAME: NAME of each JSON message on stdin, one a line (either JSON spelling).
field() {
  python3 -c '
import json, re, sys
names = {sys.argv[1], re.sub(r"_(.)", lambda m: m.group(1).upper(), sys.argv[1])}
text, at, decoder = sys.stdin.read(), 0, json.JSONDecoder()
while text[at:].strip():
    message, at = decoder.raw_decode(text, len(text) - len(text[at:].lstrip()))
    print(next((message[n] for n in names if n in message), ""))
' "$1"
}

command -v "$grpcurl" >/dev/null || fail "$grpcurl not found: run scripts/tools or set GRPCURL"

out=$(meta list) || fail "list: $out"
for service in "$svc" grpc.health.v1.Health; do
  grep -qx "$service" <<<"$out" || fail "list does not include $service: $out"
done
out=$(meta describe "$svc") || fail "describe $svc: $out"
for method in GetChangeToken GetChangeTokenStatus SubmitChange WatchToken; do
  grep -q "rpc $method " <<<"$out" || fail "describe $svc does not mention rpc $method: $out"
done
out=$(meta describe changetoken.v1.WatchTokenResponse) ||
  fail "describe changetoken.v1.WatchTokenResponse: $out"
grep -q changed_at <<<"$out" || fail "describe changetoken.v1.WatchTokenResponse: $out"

out=$(rpc "$svc/GetChangeToken" '{"scope":"interop/grpcurl"}') || fail "GetChangeToken: $out"
token=$(field change_token <<<"$out") || fail "GetChangeToken: not JSON: $out"
[[ $token =~ $uuid_v4 ]] || fail "GetChangeToken: '$token' is not a lowercase UUIDv4"

out=$(rpc "$svc/GetChangeTokenStatus" "{\"change_token\":\"$token\"}") ||
  fail "GetChangeTokenStatus: $out"
[[ $(field change_token_status <<<"$out") == CHANGE_TOKEN_STATUS_PROVISIONED ]] ||
  fail "GetChangeTokenStatus of a fresh token: $out"

out=$(rpc "$svc/SubmitChange" \
  "{\"change_token\":\"$token\",\"payload\":\"aGVsbG8=\",\"description\":\"grpcurl\"}") ||
  fail "SubmitChange: $out"
[[ $(field revision <<<"$out") =~ ^[1-9][0-9]*$ ]] || fail "SubmitChange: no revision: $out"

# Watching after the submit starts at PENDING, or at INSYNC once propagation is over.
out=$(rpc "$svc/WatchToken" "{\"change_token\":\"$token\"}") ||
  fail "WatchToken did not end with OK within 10 s: $out"
statuses=$(field change_token_status <<<"$out") || fail "WatchToken: not JSON: $out"
[[ $statuses == $'CHANGE_TOKEN_STATUS_PENDING\nCHANGE_TOKEN_STATUS_INSYNC' ||
  $statuses == CHANGE_TOKEN_STATUS_INSYNC ]] ||
  fail "WatchToken: expected PENDING then INSYNC, got: $out"
[[ $(field change_token <<<"$out" | sort -u) == "$token" ]] ||
  fail "WatchToken: messages for another token: $out"

for service in "" "$svc"; do
  out=$(rpc grpc.health.v1.Health/Check "{\"service\":\"$service\"}") ||
    fail "Health/Check '$service': $out"
  [[ $(field status <<<"$out") == SERVING ]] || fail "Health/Check '$service': $out"
done

if out=$(rpc "$svc/GetChangeTokenStatus" '{"change_token":"nope"}'); then
  fail "GetChangeTokenStatus of 'nope' succeeded: $out"
fi
grep -q InvalidArgument <<<"$out" || fail "GetChangeTokenStatus of 'nope': $out"
# The ErrorInfo detail decodes through reflection, reason included.
grep -q '"reason":"INVALID_CHANGE_TOKEN"' <<<"$out" || fail "no decoded ErrorInfo reason: $out"

echo "grpcurl: ok"
