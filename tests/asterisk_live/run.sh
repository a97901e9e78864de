#!/bin/bash
# The shipped Asterisk-side snippets against a real Asterisk 22: the README's manager.conf,
# cdr_manager.conf and cdr.conf, and dialplan/clickphone-outbound.conf, loaded by Debian's
# Asterisk 22 (the sid package) in a systemd-nspawn container that shares this host's network.
# Real SIP calls (sipp) go through the outbound context: FastAGI authorize against the daemon
# run from this checkout, Dial's L() from CLICKPHONE_MAXSEC, the hangup causes of a DENY, fail
# closed with the daemon down but 112; the CDRs come back over AMI and are charged once.
# Not part of `make test`: it needs root, the Debian mirror once (~400 MB) and a minute.
#
#   sudo tests/asterisk_live/run.sh [CACHE_DIR]   (default /var/lib/machines/clickphone-asterisk)
#   sudo KEEP=1 tests/asterisk_live/run.sh        (leave Asterisk running, print how to reach it)
#
# Needs: systemd-nspawn (apt-get install systemd-container), debootstrap, sipp (apt-get install
# sip-tester) on this host, and `make test`'s .venv (created if missing). Ports on 127.0.0.1:
# 5038 (AMI), 5060 (SIP), 4573 (FastAGI), 2526 (SMTP sink) must be free. Exit status 0 when
# every check passed.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
BASE=${1:-/var/lib/machines/clickphone-asterisk}
RUN=$BASE.run.$$
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECRET=live-$$-$RANDOM$RANDOM

[ "$(id -u)" = 0 ] || { echo "run.sh: needs root (debootstrap, systemd-nspawn)" >&2; exit 2; }
for tool in systemd-nspawn debootstrap sipp; do
    command -v "$tool" >/dev/null || { echo "run.sh: $tool missing (apt-get install systemd-container debootstrap sip-tester)" >&2; exit 2; }
done

if [ ! -e "$BASE/.clickphone-asterisk" ]; then
    echo "== debootstrap Debian sid with Asterisk into $BASE (once)"
    rm -rf "$BASE"
    debootstrap --variant=minbase --include=asterisk,asterisk-modules,procps sid "$BASE" "$MIRROR" \
        > "$BASE.debootstrap.log" 2>&1 || { echo "run.sh: debootstrap failed, see $BASE.debootstrap.log" >&2; exit 1; }
    touch "$BASE/.clickphone-asterisk"
fi
make -s -C "$REPO" .venv/bin/.installed

# shellcheck disable=SC2317  # run by the EXIT trap
cleanup() {
    if [ -n "${KEEP:-}" ] && [ -n "${PBX:-}" ]; then
        echo "KEEP: Asterisk runs on: chroot $RUN asterisk -r; then kill $PBX and rm -rf $RUN"
        return
    fi
    if [ -n "${PBX:-}" ]; then
        kill "$PBX" 2>/dev/null || true
        wait "$PBX" 2>/dev/null || true
    fi
    rm -rf "$RUN" "$RUN.console.log"
}
trap cleanup EXIT

cp -a "$BASE" "$RUN"
ETC=$RUN/etc/asterisk
install -d "$ETC/clickphone"
install -m 0644 "$REPO"/dialplan/*.conf "$ETC/clickphone/"
install -m 0644 "$REPO/etc/asterisk/cdr_manager.conf" "$ETC/cdr_manager.conf"
install -m 0644 "$REPO/etc/asterisk/cdr.conf.clickphone" "$ETC/cdr.conf"
{ cat "$HERE/asterisk/manager-general.conf"; echo
  sed "s/^secret = CHANGE-ME$/secret = $SECRET/" "$REPO/etc/asterisk/manager.conf.clickphone"; } > "$ETC/manager.conf"
grep -q "^secret = $SECRET$" "$ETC/manager.conf" || { echo "run.sh: the shipped manager.conf has no 'secret = CHANGE-ME' line" >&2; exit 1; }
install -m 0644 "$HERE"/asterisk/{pjsip,extensions,logger,voicemail,queues}.conf "$ETC/"
# Debian ships app_voicemail_odbc and _imap beside app_voicemail: with autoload, the odbc one
# fails to load and takes the VoiceMail application away with it ("No application 'VoiceMail'")
sed -i 's/^\[modules\]$/[modules]\nnoload => app_voicemail_odbc.so\nnoload => app_voicemail_imap.so/' "$ETC/modules.conf"
# a Romanian operator's host: Asterisk's CDR times are Bucharest wall-clock times
ln -sf /usr/share/zoneinfo/Europe/Bucharest "$RUN/etc/localtime"
echo Europe/Bucharest > "$RUN/etc/timezone"
# the README: systemname = pbx1 in asterisk.conf's [options]
sed -i 's/^\[options\]$/[options]\nsystemname = pbx1/' "$ETC/asterisk.conf"
install -d "$RUN/var/spool/asterisk/fax"  # CLICKPHONE_FAX_SPOOL of dialplan/clickphone-fax.conf
install -m 0644 "$REPO/tests/fixtures/spool/fax/test-fax.tiff" "$RUN/var/spool/asterisk/fax/"
rm -f "$RUN"/var/log/asterisk/full "$RUN"/var/log/asterisk/cdr-csv/Master.csv

# shellcheck disable=SC2016  # dpkg-query's own ${Version}
echo "== Asterisk $(chroot "$RUN" dpkg-query -W -f '${Version}' asterisk) in $RUN"
# --timezone=off: nspawn would otherwise point the container's /etc/localtime at the host's zone
systemd-nspawn -q --register=no --keep-unit --timezone=off -D "$RUN" --as-pid2 \
    /usr/sbin/asterisk -f -n -q > "$RUN.console.log" 2>&1 &
PBX=$!

"$REPO/.venv/bin/python" "$HERE/check.py" --root "$RUN" --secret "$SECRET" --repo "$REPO"
