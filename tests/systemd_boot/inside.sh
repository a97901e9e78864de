#!/bin/bash
# The container's side of tests/systemd_boot/run.sh (see there). The checkout is at /src (read-only).
#   inside.sh setup   not booted: install as the README's "Deployment under systemd" says, plus
#                     what Asterisk would leave (its group, its spool) and a lab site's conf.d
#   inside.sh check   booted (systemd is PID 1): start the unit beside a simulated Asterisk and
#                     check what systemd and the daemon do; one PASS/FAIL line per check
#   inside.sh fence   booted again with unified cgroups and bpf() allowed: the IP fence holds
#                     and the daemon does not warn
set -uo pipefail
SRC=/src
SECRET=nspawn-lab-secret
UNIT=clickphone-agi
FAILED=0

check() {  # check NAME STATUS [DETAIL]: STATUS 0 passes
    if [ "$2" -eq 0 ]; then echo "PASS $1"; else echo "FAIL $1${3:+: $3}"; FAILED=$((FAILED + 1)); fi
}
prop() { systemctl show "$UNIT" -p "$1" --value; }
journal_has() {  # journal_has FIXED-TEXT [SINCE]: the unit's journal holds the text (read whole:
    # grep -q would close the pipe early and pipefail would count journalctl's SIGPIPE as a miss)
    local text; text=$(journalctl -u "$UNIT" ${2:+--since "$2"} -o cat --no-pager)
    grep -qF -- "$1" <<<"$text"
}

setup() {
    set -ex
    update-ca-certificates >/dev/null  # the host's CAs (a proxied registry), copied in by run.sh
    rm -rf /tmp/src && cp -a "$SRC" /tmp/src && rm -rf /tmp/src/.venv /tmp/src/.git
    # --- the README's steps, word for word but the paths -----------------------------------
    python3 -m venv /opt/clickphone-agi/.venv
    /opt/clickphone-agi/.venv/bin/pip install -q /tmp/src
    ln -sf /opt/clickphone-agi/.venv/bin/clickphone-agi /usr/bin/clickphone-agi
    groupadd -f -r asterisk  # what Asterisk's package leaves: its group, a group-readable spool
    install -d -m 0750 -g asterisk /var/spool/asterisk /var/spool/asterisk/voicemail /var/spool/asterisk/fax
    cd /tmp/src
    install -m 0644 systemd/clickphone-agi.sysusers /usr/lib/sysusers.d/clickphone-agi.conf
    install -m 0644 systemd/clickphone-agi.tmpfiles /usr/lib/tmpfiles.d/clickphone-agi.conf
    systemd-sysusers clickphone-agi.conf && systemd-tmpfiles --create clickphone-agi.conf
    install -D -m 0644 etc/clickphone-agi.yaml /etc/clickphone-agi/clickphone-agi.yaml
    install -m 0600 /dev/null /etc/clickphone-agi/secrets/ami-secret
    install -m 0600 /dev/null /etc/clickphone-agi/secrets/smtp-password
    install -m 0600 /dev/null /etc/clickphone-agi/secrets/api-token
    install -m 0600 /dev/null /etc/clickphone-agi/secrets/unsubscribe-secret
    head -c 32 /dev/urandom | base64 > /etc/clickphone-agi/secrets/unsubscribe-secret
    echo "$SECRET" > /etc/clickphone-agi/secrets/ami-secret
    head -c 24 /dev/urandom | base64 > /etc/clickphone-agi/secrets/api-token
    install -m 0644 systemd/clickphone-agi.service /etc/systemd/system/
    # --- the lab site: tariffs, the lab's contexts, FastAGI and the API on, a sink on 2525 ---
    install -m 0644 etc/tariffs.yaml /etc/clickphone-agi/tariffs.yaml
    install -d -m 0755 /etc/clickphone-agi/conf.d
    cat > /etc/clickphone-agi/conf.d/50-lab.yaml <<'YAML'
agi:
  enabled: true
smtp:
  port: 2525
  retry_min: 5    # the boot's start queues the voicemail with no relay up: retried soon
  retry_max: 10
billing:
  tariffs_file: /etc/clickphone-agi/tariffs.yaml
  billing_cdr:
    destination_contexts: [lab-outbound]
notifications:
  inbound_contexts: [lab-inbound]
  missed_call_grace: 1
api:
  enabled: true
YAML
    clickphone-agi check-config
    systemctl enable "$UNIT"  # as an operator would; the boot's start finds no Asterisk: fine
    # --- Postfix as the README's "Delivery, bounces and the outbox" sets it up, for the bounce
    # check (the daemon mails through the SMTP sink on 2525 until then) -----------------------
    echo "postfix postfix/main_mailer_type select Local only" | debconf-set-selections
    echo "postfix postfix/mailname string pbx1.clickphone.example" | debconf-set-selections
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q postfix >/dev/null
    # shellcheck disable=SC2016  # Postfix's own $mydestination
    postconf -e 'relay_domains = $mydestination, bounces.clickphone.example' \
        'transport_maps = hash:/etc/postfix/transport' 'recipient_delimiter = +' \
        'clickphone-bounce_destination_recipient_limit = 1'
    echo 'bounces.clickphone.example    clickphone-bounce:' > /etc/postfix/transport
    postmap /etc/postfix/transport
    cat >> /etc/postfix/master.cf <<'MASTER'
clickphone-bounce unix  -       n       n       -       4       pipe
  flags=Rq user=clickphone-agi argv=/usr/bin/clickphone-agi bounce --recipient ${recipient}
MASTER
    # the lab's part: example.ro is local here and any local recipient passes RCPT, so an unknown
    # one becomes a DSN to the envelope sender, as a remote domain's MX would send back
    # shellcheck disable=SC2016
    postconf -e 'mydestination = $myhostname, localhost, example.ro' 'local_recipient_maps ='
    cat > /root/70-postfix.yaml <<'YAML'  # not /tmp: a tmpfs once booted
smtp:
  port: 25
  bounce_domain: bounces.clickphone.example
YAML
    # --- the lab's data: a database gone live before the recorded calls (2026-11-28), the
    # subscriber, and the voicemail message and fax Asterisk left in its spool ----------------
    install -d -o clickphone-agi -g clickphone-agi -m 0750 /var/lib/clickphone-agi
    runuser -u clickphone-agi -- /opt/clickphone-agi/.venv/bin/python -c '
from datetime import UTC, datetime
from pathlib import Path
from clickphone_agi.adapters.storage import sqlite as db
path = Path("/var/lib/clickphone-agi/clickphone-agi.db")
conn = db.connect_sync(path)
db.migrate(conn, datetime(2026, 11, 27, tzinfo=UTC), path)
conn.close()'
    cat > /tmp/accounts.yaml <<'YAML'
accounts:
  - {code: acct1001, name: Ion Popescu, email: ion.popescu@example.ro, daily_limit: "5.00",
     allowed_ips: ["127.0.0.1"], dids: ["+40212345678"], mailboxes: [{box: 100@default}],
     opening_balance: "20.00"}
YAML
    runuser -u clickphone-agi -- clickphone-agi accounts import /tmp/accounts.yaml
    local sim box=/var/spool/asterisk/voicemail/default/100/INBOX
    sim=$(/opt/clickphone-agi/.venv/bin/python -c 'import clickphone_agi.sim as s, os; print(os.path.dirname(s.__file__))')/spool
    install -d -m 0750 -g asterisk "$(dirname "$(dirname "$box")")" "$(dirname "$box")" "$box"
    install -m 0640 -g asterisk "$sim"/voicemail/default/100/INBOX/msg0000.* "$box"/
    install -m 0640 -g asterisk "$sim"/fax/rx-1795882939.18.tif /var/spool/asterisk/fax/
    echo SETUP-OK
}

wait_for() {  # wait_for SECONDS COMMAND...: until COMMAND succeeds
    local until=$((SECONDS + $1)); shift
    until "$@"; do [ $SECONDS -ge $until ] && return 1; sleep 0.5; done
}

main_pid_ok() {  # the unit's main PID is up and differs from $1
    local pid; pid=$(prop MainPID)
    [ "$pid" != 0 ] && [ "$pid" != "$1" ] && [ "$(prop SubState)" = running ]
}

fence_check() {  # fence_check SINCE: the unit's IP fence (IPAddressDeny=any, IPAddressAllow=localhost)
    # holds only where systemd can enforce it (unified cgroups and bpf()); the daemon started
    # since SINCE must have warned exactly when it does not. Measured, as the daemon does: a
    # transient unit with the same fence fetches a page from this host's own outward address.
    local addr fenced=1 warned=1
    addr=$(python3 -c 'import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.connect(("192.0.2.1", 9)); print(s.getsockname()[0])' 2>/dev/null)
    if [ -z "$addr" ] || [ "$addr" = 127.0.0.1 ]; then
        echo "NOTE no address but loopback here: the IP fence was not probed"
        return
    fi
    python3 -m http.server --bind "$addr" 8765 >/dev/null 2>&1 &
    local web=$!
    sleep 1
    systemd-run --wait --pipe -q -p IPAddressDeny=any -p IPAddressAllow=localhost \
        python3 -c "import urllib.request as u; u.urlopen('http://$addr:8765/', timeout=3)" 2>/dev/null && fenced=0
    kill "$web"
    journal_has '"event": "systemd.ip_filter_not_enforced"' "$1" || warned=0
    [ "$warned" -ne "$fenced" ]
    check "IPAddressDeny= $([ "$fenced" = 1 ] && echo enforced || echo NOT enforced) on this host ($(stat -fc %T /sys/fs/cgroup) at /sys/fs/cgroup): the daemon's warning $([ "$warned" = 1 ] && echo given || echo not given), as it should" $?
}

check_fence() {  # a second boot, with unified cgroups and bpf() allowed: the fence holds
    systemctl is-system-running --wait >/dev/null 2>&1
    local started; started=$(date '+%Y-%m-%d %H:%M:%S')
    systemctl restart "$UNIT"
    check "Type=notify start (unified cgroups)" $?
    fence_check "$started"
    echo "FAILED=$FAILED"
    return $((FAILED > 0))
}

check_booted() {
    systemctl is-system-running --wait >/dev/null 2>&1  # "degraded" is fine here
    systemctl stop "$UNIT"  # started at boot with no Asterisk yet; start it beside the simulator
    rm -f /run/sim-ready
    /opt/clickphone-agi/.venv/bin/python "$SRC"/tests/systemd_boot/sim_asterisk.py \
        --secret "$SECRET" --mail /root/mail --ready /run/sim-ready > /root/sim.log 2>&1 &
    local sim=$!
    wait_for 60 test -e /run/sim-ready
    local started; started=$(date '+%Y-%m-%d %H:%M:%S')
    systemctl start "$UNIT"
    check "Type=notify start: READY=1 within TimeoutStartSec" $? "$(systemctl status "$UNIT" --no-pager 2>&1 | tail -5)"
    wait $sim
    local sim_failed=$?
    grep -E '^(PASS|FAIL) ' /root/sim.log
    FAILED=$((FAILED + sim_failed))
    local pid; pid=$(prop MainPID)
    local status; status=$(prop StatusText)
    [[ "$status" == *"mails sent"* ]]
    check "STATUS= line (systemctl status)" $? "$status"

    # --- the sandbox as the kernel sees it, on the daemon and its fax worker ----------------
    local p bad=""
    for p in $(pgrep -u clickphone-agi); do
        grep -q '^Seccomp:[[:space:]]*2' /proc/"$p"/status || bad+=" $p:seccomp"
        grep -q '^NoNewPrivs:[[:space:]]*1' /proc/"$p"/status || bad+=" $p:nnp"
        grep -q '^CapEff:[[:space:]]*0000000000000000' /proc/"$p"/status || bad+=" $p:caps"
    done
    [ -z "$bad" ]
    check "seccomp filter, no_new_privs and no capabilities on every process of the unit" $? "$bad"
    local worker; worker=$(pgrep -u clickphone-agi -f spawn_main)
    [ "$(wc -w <<<"$worker")" -eq 1 ]
    check "the fax converter runs as a worker process of the unit" $? "$(pgrep -a -u clickphone-agi)"
    # its own caps are best effort under the unit's seccomp filter: the address space (1 GiB)
    # holds with glibc (prlimit64), the nice is refused (setpriority, @resources): both reported
    local cap; cap=$(awk '/^Max address space/ { print $4 }' /proc/"$worker"/limits 2>/dev/null)
    [ "$cap" = 1073741824 ]
    check "the fax worker's address space capped at 1 GiB" $? "limit ${cap:-?}"
    echo "NOTE the fax worker's nice value: $(ps -o ni= -p "$worker") (10 wanted; 0 when the unit's filter refuses it)"

    # the file system as the daemon sees it (its mount namespace; root there, so only mounts
    # stop a write): read-only but its state directory, the spool read-only, homes and /tmp its own
    local ns=(nsenter -t "$pid" -m) marker; marker="fs-check-$$"
    ! "${ns[@]}" touch /etc/clickphone-agi/"$marker" 2>/dev/null \
        && ! "${ns[@]}" touch /usr/"$marker" 2>/dev/null \
        && ! "${ns[@]}" touch /var/spool/asterisk/fax/"$marker" 2>/dev/null \
        && "${ns[@]}" touch /var/lib/clickphone-agi/"$marker" && "${ns[@]}" rm /var/lib/clickphone-agi/"$marker"
    check "ProtectSystem=strict: /etc, /usr and the spool read-only to the daemon, its state directory writable" $?
    touch /tmp/"$marker"
    [ -n "$(ls -A /root)" ] && [ -z "$("${ns[@]}" ls -A /root 2>/dev/null)" ] && ! "${ns[@]}" test -e /tmp/"$marker"
    check "ProtectHome=yes, PrivateTmp=yes: /root empty and the host's /tmp unseen by the daemon" $?
    rm -f /tmp/"$marker"
    local proc
    # shellcheck disable=SC2016  # awk's own $5 and $NF
    proc=$("${ns[@]}" awk '$5 == "/proc" { print $NF }' /proc/self/mountinfo | tail -1)
    [[ ",$proc," == *",hidepid=invisible,"* && ",$proc," == *",subset=pid,"* ]]
    check "ProtectProc=invisible, ProcSubset=pid: the daemon's /proc is mounted $proc" $?

    local exposure
    exposure=$(systemd-analyze security "$UNIT" --no-pager 2>/dev/null | sed -n 's/.*exposure level for .*: \([0-9.]*\) .*/\1/p')
    awk -v e="${exposure:-99}" 'BEGIN { exit !(e <= 1.5) }'
    check "systemd-analyze security (live unit): exposure $exposure <= 1.5" $?

    fence_check "$started"

    # --- reload, crash, wedge, stop, refused configuration ---------------------------------
    local since; since=$(date '+%Y-%m-%d %H:%M:%S')
    systemctl reload "$UNIT" && sleep 1
    journal_has '"event": "config.reloaded"' "$since" && [ "$(prop MainPID)" = "$pid" ] && [ "$(prop ActiveState)" = active ]
    check "systemctl reload: SIGHUP reloads in place (same PID, still active)" $?

    # 90-: last in name order (70-postfix.yaml, later, sets smtp.port and would hide the typo)
    printf 'smtp:\n  port: abc\n' > /etc/clickphone-agi/conf.d/90-typo.yaml
    since=$(date '+%Y-%m-%d %H:%M:%S')
    systemctl reload "$UNIT" && sleep 1
    [ "$(prop MainPID)" = "$pid" ] && [ "$(prop ActiveState)" = active ] && [ "$(prop SubState)" = running ] \
        && [[ "$(prop StatusText)" == "reload failed, running on previous configuration"* ]] \
        && journal_has '90-typo.yaml:2:3: smtp.port' "$since"
    check "a refused reload: the daemon runs on, active (READY=1 after RELOADING=1), STATUS= and journal say why" $? \
        "$(prop ActiveState)/$(prop SubState): $(prop StatusText)"
    rm -f /etc/clickphone-agi/conf.d/90-typo.yaml
    systemctl reload "$UNIT" && sleep 1

    # --- a bounce through a real Postfix: the VERP sender, the DSN, the pipe, `bounce` ------
    install -m 0644 /root/70-postfix.yaml /etc/clickphone-agi/conf.d/70-postfix.yaml
    systemctl restart "$UNIT"
    clickphone-agi mail-test ion.popescu@example.ro >/dev/null
    bounced() {
        clickphone-agi outbox list --status bounced 2>/dev/null | python3 -c \
            'import json, sys; rows = json.load(sys.stdin); sys.exit(not any(r["kind"] == "mail_test" for r in rows))'
    }
    wait_for 60 bounced
    check "a DSN from Postfix (5.1.1 unknown user) reaches 'bounce' through the README's pipe transport: the row is bounced" $? \
        "$(journalctl -t postfix/local -t postfix/pipe -o cat --no-pager | tail -3)"
    pid=$(prop MainPID)

    local restarts; restarts=$(prop NRestarts)
    kill -KILL "$pid"
    wait_for 30 main_pid_ok "$pid"
    check "killed by SIGKILL: restarted after RestartSec (NRestarts $restarts -> $(prop NRestarts))" $?
    [ -z "$(pgrep -u clickphone-agi -f spawn_main)" ]  # the new daemon starts a worker at its first fax only
    check "the killed daemon's fax worker went with it" $? "$(pgrep -a -u clickphone-agi)"

    pid=$(prop MainPID)
    kill -STOP "$pid"
    local stopped=$SECONDS
    wait_for 60 main_pid_ok "$pid"
    local took=$((SECONDS - stopped))
    journal_has "Failed with result 'watchdog'"
    check "a wedged event loop (SIGSTOP): the watchdog restarts it (${took} s, WatchdogSec=30)" $?

    systemctl stop "$UNIT"
    [ "$(prop ExecMainStatus)" = 0 ] && ! pgrep -u clickphone-agi >/dev/null
    check "systemctl stop: graceful exit 0, no process left" $? "status $(prop ExecMainStatus)"

    printf 'smtp:\n  port: abc\n' > /etc/clickphone-agi/conf.d/90-typo.yaml
    since=$(date '+%Y-%m-%d %H:%M:%S')
    systemctl start "$UNIT" 2>/dev/null
    sleep 7  # longer than RestartSec: a restart would have happened by now
    # (not NRestarts: a manual start sets it back to 0)
    [ "$(prop ExecMainStatus)" = 78 ] && [ "$(prop ActiveState)" = failed ] \
        && ! journal_has "Scheduled restart job" "$since" && journal_has '90-typo.yaml:2:3: smtp.port' "$since"
    check "a refused configuration: exit 78 named FILE:LINE:COL in the journal, no restart loop" $? \
        "status $(prop ExecMainStatus), state $(prop ActiveState);
$(journalctl -u "$UNIT" --since "$since" -o cat --no-pager)"
    rm -f /etc/clickphone-agi/conf.d/90-typo.yaml
    systemctl reset-failed "$UNIT"

    echo "FAILED=$FAILED"
    return $((FAILED > 0))
}

case "${1:-}" in
    setup) setup ;;
    check) check_booted ;;
    fence) check_fence ;;
    *) echo "usage: $0 setup|check|fence" >&2; exit 2 ;;
esac
