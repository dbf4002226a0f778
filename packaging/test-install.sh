#!/usr/bin/env bash
# Builds the .deb and .rpm, installs the .deb on this machine, checks what it
# installed, provisions a SoftHSM token the way the README says, runs init,
# doctor and the server as the service user, then removes and purges.
# Needs root (dpkg). CI runs it; it changes the machine, so run it on a
# throwaway one.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "run as root (it installs a package)" >&2; exit 1; }
fail() { echo "test-install: FAIL: $*" >&2; exit 1; }
ok() { echo "test-install: ok: $*"; }

export DEBIAN_FRONTEND=noninteractive
for p in lintian rpm softhsm2 curl; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need="${need:-} $p"
done
[ -z "${need:-}" ] || { apt-get update -qq; apt-get install -y -qq --no-install-recommends $need >/dev/null; }
packaging/build.sh
deb=$(ls -t target/debian/tokenvault-webhook_*.deb | head -1)
rpmf=$(ls -t target/generate-rpm/*.rpm | head -1)
ok "built $deb and $rpmf"

echo "--- lintian"
lintian --profile debian --fail-on error,warning --suppress-tags-from-file packaging/lintian-unfixable "$deb" \
  || fail "lintian reported errors or warnings"
ok "lintian: no errors or warnings"

# Start clean.
dpkg -P tokenvault-webhook >/dev/null 2>&1 || true
rm -rf /var/lib/tokenvault-webhook /etc/tokenvault-webhook
apt-get install -y -qq "./$deb" >/dev/null
ok "installed"

check_mode() { # path mode owner group
  [ -e "$1" ] || fail "$1 missing"
  got=$(stat -c '%a %U %G' "$1")
  [ "$got" = "$2 $3 $4" ] || fail "$1: $got, expected $2 $3 $4"
}
getent passwd tokenvault-webhook | grep -q nologin || fail "service user missing or has a shell"
check_mode /usr/bin/tokenvault-webhook 755 root root
check_mode /lib/systemd/system/tokenvault-webhook.service 644 root root
check_mode /usr/lib/sysusers.d/tokenvault-webhook.conf 644 root root
check_mode /usr/lib/tmpfiles.d/tokenvault-webhook.conf 644 root root
check_mode /etc/tokenvault-webhook 750 root tokenvault-webhook
check_mode /etc/tokenvault-webhook/config.toml 640 root tokenvault-webhook
check_mode /etc/tokenvault-webhook/softhsm2.conf 640 root tokenvault-webhook
check_mode /var/lib/tokenvault-webhook 700 tokenvault-webhook tokenvault-webhook
check_mode /usr/share/man/man1/tokenvault-webhook.1.gz 644 root root
[ -f /usr/share/doc/tokenvault-webhook/README.md ] || fail "README not installed"
ok "files, owners, modes, user"

tokenvault-webhook --config /etc/tokenvault-webhook/config.toml configtest || fail "configtest on the shipped config"
ok "configtest on the shipped config"

echo "--- systemd-analyze"
systemd-analyze verify /lib/systemd/system/tokenvault-webhook.service || fail "systemd-analyze verify"
exposure=$(systemd-analyze security --offline=true /lib/systemd/system/tokenvault-webhook.service | awk '/Overall exposure level/ {print $(NF-2)}')
echo "exposure: $exposure"
awk -v e="$exposure" 'BEGIN { exit !(e <= 1.5) }' || fail "exposure $exposure > 1.5"
ok "unit verifies; exposure $exposure <= 1.5"

echo "--- operator recipe on SoftHSM (systemd is not PID 1 here: run the service's commands by hand)"
as_svc() { runuser -u tokenvault-webhook -- "$@"; }
umask 027
head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' > /etc/tokenvault-webhook/hsm-user-pin
chgrp tokenvault-webhook /etc/tokenvault-webhook/hsm-user-pin; chmod 640 /etc/tokenvault-webhook/hsm-user-pin
so=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
as_svc env SOFTHSM2_CONF=/etc/tokenvault-webhook/softhsm2.conf softhsm2-util --init-token --free --label tokenvault \
  --so-pin "$so" --pin "$(cat /etc/tokenvault-webhook/hsm-user-pin)" >/dev/null
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 90 -subj /CN=localhost \
  -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
  -keyout /etc/tokenvault-webhook/tls/key.pem -out /etc/tokenvault-webhook/tls/cert.pem 2>/dev/null
chgrp tokenvault-webhook /etc/tokenvault-webhook/tls/*.pem; chmod 640 /etc/tokenvault-webhook/tls/*.pem
as_svc tokenvault-webhook --config /etc/tokenvault-webhook/config.toml init
as_svc tokenvault-webhook --config /etc/tokenvault-webhook/config.toml doctor || fail "doctor"
ok "init and doctor pass against a SoftHSM token"
log=$(mktemp)
as_svc tokenvault-webhook --config /etc/tokenvault-webhook/config.toml serve 2>"$log" &
pid=$!
for _ in $(seq 50); do grep -q READY "$log" && break; sleep 0.2; done
grep -q "landlock enforced" "$log" || { cat "$log"; fail "landlock not enforced under the shipped config"; }
curl -sf --cacert /etc/tokenvault-webhook/tls/cert.pem https://127.0.0.1:8443/v1/health | grep -q '"status":"healthy"' \
  || { cat "$log"; fail "health"; }
pkill -TERM -u tokenvault-webhook -f "tokenvault-webhook --config" || true
wait $pid || true
ok "serves under the shipped config with Landlock"

echo "--- remove and purge"
dpkg -r tokenvault-webhook >/dev/null
[ ! -e /usr/bin/tokenvault-webhook ] || fail "binary left after remove"
[ -f /etc/tokenvault-webhook/config.toml ] || fail "remove must keep conffiles"
dpkg -P tokenvault-webhook >/dev/null
[ ! -e /etc/tokenvault-webhook ] || fail "purge left /etc/tokenvault-webhook"
[ -d /var/lib/tokenvault-webhook ] || fail "purge must keep state unless asked"
apt-get install -y -qq "./$deb" >/dev/null
TOKENVAULT_WEBHOOK_PURGE_STATE=yes dpkg -P tokenvault-webhook >/dev/null
[ ! -e /var/lib/tokenvault-webhook ] || fail "purge with TOKENVAULT_WEBHOOK_PURGE_STATE=yes left state"
ok "remove keeps config; purge keeps state unless asked"

echo "--- rpm"
files=$(rpm -qpl "$rpmf")
echo "$files"
grep -q /usr/lib/systemd/system/tokenvault-webhook.service <<<"$files" || fail "rpm lacks the unit"
grep -q /etc/tokenvault-webhook/config.toml <<<"$files" || fail "rpm lacks the config"
rpm -qp --scripts "$rpmf" | grep -q systemd-sysusers || fail "rpm scriptlets do not create the user"
ok "rpm built and inspected: $rpmf"
echo "test-install: 1 passed, 0 failed"
