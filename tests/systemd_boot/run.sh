#!/bin/bash
# The shipped unit under a real systemd: boot Debian 12 in a systemd-nspawn container, install
# clickphone-agi as the README says, and check what systemd does with it (Type=notify, reload,
# Restart=, the watchdog, RestartPreventExitStatus=, the sandbox on the daemon and its fax
# worker, whether the IP fence holds and the daemon says so) beside a simulated Asterisk; then
# boots again with unified cgroups and bpf() allowed, where the fence must hold. Not part of
# `make test`: it needs root, about 600 MB and a few minutes, and the test machines run no
# systemd of their own.
#
#   sudo tests/systemd_boot/run.sh [CACHE_DIR]      (default /var/lib/machines/clickphone-base)
#   sudo KEEP=1 tests/systemd_boot/run.sh           (stop after the first boot, leave it running)
#
# Needs: systemd-nspawn (apt-get install systemd-container) and debootstrap; the Debian mirror
# and PyPI reachable. CACHE_DIR keeps the bare Debian tree between runs; each run works on a
# copy, removed at the end. Exit status 0 when every check passed.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
BASE=${1:-/var/lib/machines/clickphone-base}
RUN=$BASE.run.$$
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
NSPAWN=(systemd-nspawn -q --register=no --keep-unit --bind-ro="$REPO":/src)

[ "$(id -u)" = 0 ] || { echo "run.sh: needs root (debootstrap, systemd-nspawn)" >&2; exit 2; }
for tool in systemd-nspawn debootstrap nsenter; do
    command -v "$tool" >/dev/null || { echo "run.sh: $tool missing (apt-get install systemd-container debootstrap)" >&2; exit 2; }
done

if [ ! -e "$BASE/.clickphone-base" ]; then
    echo "== debootstrap Debian 12 into $BASE (once)"
    rm -rf "$BASE"
    debootstrap --include=systemd,systemd-sysv,dbus,python3,python3-venv,python3-pip,ca-certificates,procps \
        bookworm "$BASE" "$MIRROR" > "$BASE.debootstrap.log" 2>&1 \
        || { echo "run.sh: debootstrap failed, see $BASE.debootstrap.log" >&2; exit 1; }
    touch "$BASE/.clickphone-base"
fi

poweroff() {  # the booted container, if any: shut down, then gone
    if [ -n "${LEADER:-}" ] && kill -0 "$LEADER" 2>/dev/null; then
        nsenter -t "$LEADER" -a systemctl poweroff >/dev/null 2>&1 || true
    fi
    if [ -n "${BOOT:-}" ]; then
        for _ in $(seq 60); do kill -0 "$BOOT" 2>/dev/null || break; sleep 0.5; done
        kill "$BOOT" 2>/dev/null || true
        wait "$BOOT" 2>/dev/null || true
    fi
    LEADER="" BOOT=""
}
# shellcheck disable=SC2317  # run by the EXIT trap
cleanup() {
    if [ -n "${KEEP:-}" ] && [ -n "${LEADER:-}" ]; then
        echo "KEEP: the container runs on: nsenter -t $LEADER -a bash; then kill $BOOT and rm -rf $RUN"
        return
    fi
    poweroff
    rm -rf "$RUN" "$RUN.console.log"
}
trap cleanup EXIT

boot() {  # boot [NSPAWN OPTION...]: systemd as the container's PID 1; sets LEADER and BOOT
    "${NSPAWN[@]}" -D "$RUN" "$@" -b >> "$RUN.console.log" 2>&1 &
    BOOT=$!
    LEADER=""
    for _ in $(seq 120); do
        LEADER=$(pgrep -P "$BOOT" | head -1 || true)
        # PID 1 up, and its bus too: systemctl fails with "Failed to connect to bus" before that
        [ -n "$LEADER" ] && [ "$(cat /proc/"$LEADER"/comm 2>/dev/null)" = systemd ] \
            && nsenter -t "$LEADER" -m test -S /run/systemd/private && return 0
        sleep 0.5
    done
    echo "run.sh: the container did not boot, see $RUN.console.log" >&2
    exit 1
}

cp -a "$BASE" "$RUN"
# a registry behind a proxy with its own CA, as on the machines this was written on
cp /usr/local/share/ca-certificates/*.crt "$RUN/usr/local/share/ca-certificates/" 2>/dev/null || true
[ -e /etc/pip.conf ] && cp /etc/pip.conf "$RUN/etc/pip.conf"

echo "== install (the README's steps) in $RUN"
"${NSPAWN[@]}" -D "$RUN" /src/tests/systemd_boot/inside.sh setup > "$RUN.setup.log" 2>&1 \
    || { tail -20 "$RUN.setup.log" >&2; echo "run.sh: setup failed, log $RUN.setup.log" >&2; exit 1; }
rm -f "$RUN.setup.log"

echo "== boot systemd (cgroups as this host has them)"
boot
nsenter -t "$LEADER" -a systemctl --version | head -1
status=0
nsenter -t "$LEADER" -a /src/tests/systemd_boot/inside.sh check || status=$?
[ -n "${KEEP:-}" ] && exit "$status"  # KEEP=1: leave this boot running to look around
poweroff

# nspawn refuses bpf() to a container by default, and this host's cgroups may not be unified:
# the second boot has both, so that the unit's IP fence can hold and its check is not one-sided
echo "== boot systemd again, unified cgroups and bpf() allowed"
SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1 boot --system-call-filter=bpf --capability=CAP_BPF,CAP_NET_ADMIN,CAP_PERFMON
nsenter -t "$LEADER" -a /src/tests/systemd_boot/inside.sh fence || status=$?
exit "$status"
