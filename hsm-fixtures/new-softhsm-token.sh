#!/usr/bin/env bash
# Creates a private SoftHSM2 token with random PINs, the same layout that
# `tokenvault-webhook dev` creates itself:
#   DIR/softhsm2.conf  DIR/tokens/  DIR/user-pin  DIR/so-pin   (PIN files 0600)
# Usage: hsm-fixtures/new-softhsm-token.sh DIR [LABEL]
# Then: SOFTHSM2_CONF=DIR/softhsm2.conf tokenvault-webhook --config ... init
set -euo pipefail
dir=${1:?usage: $0 DIR [LABEL]}
label=${2:-tokenvault}
here=$(cd "$(dirname "$0")" && pwd)
command -v softhsm2-util >/dev/null || { echo "softhsm2-util not found: apt-get install softhsm2" >&2; exit 1; }
umask 077
mkdir -p "$dir/tokens"
dir=$(cd "$dir" && pwd)
sed "s#@TOKENDIR@#$dir/tokens#" "$here/softhsm2.conf.in" > "$dir/softhsm2.conf"
[ -f "$dir/user-pin" ] || head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$dir/user-pin"
[ -f "$dir/so-pin" ] || head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$dir/so-pin"
SOFTHSM2_CONF="$dir/softhsm2.conf" softhsm2-util --init-token --free --label "$label" \
  --so-pin "$(cat "$dir/so-pin")" --pin "$(cat "$dir/user-pin")" >/dev/null
echo "token '$label' created; SOFTHSM2_CONF=$dir/softhsm2.conf"
