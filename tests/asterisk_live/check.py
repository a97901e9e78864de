"""The host side of ``tests/asterisk_live/run.sh``: the daemon from this checkout beside a real
Asterisk 22, real SIP calls through the shipped outbound dialplan.

run.sh has started Asterisk (sharing this host's network) with the README's AMI user, CDR
settings and ``dialplan/``; this script provisions two accounts, starts the daemon
(``clickphone-agi run``), an SMTP sink and sipp as the carrier (127.0.0.3) and two desk phones
(127.0.0.6 rings, 127.0.0.7 answers), places calls with sipp (and a fax from Asterisk's CLI)
and prints one ``PASS``/``FAIL`` line per check; the exit status is the number of failures.
Not collected by pytest (no ``test_`` prefix).
"""

from __future__ import annotations

import argparse
import email
import email.policy
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import Envelope, Session

ACCOUNTS = """\
accounts:
  - code: acct1001
    name: Ion Popescu
    email: ion.popescu@example.ro
    allowed_ips: ["127.0.0.2"]
    dids: ["+40212345600", "+40212345601", "+40212345602", "+40212345603"]
    mailboxes:
      - box: 100@default
    blocked_classes: [premium]
    max_concurrent_calls: 1
    opening_balance: "25.00"
  - code: acct1002
    name: Maria Dobre
    email: maria.dobre@example.org
    allowed_ips: ["127.0.0.5"]
    max_call_seconds: 4
    opening_balance: "25.00"
  - code: acct1003
    name: Andrei Ionescu
    email: andrei.ionescu@example.ro
    allowed_ips: ["::1"]
    opening_balance: "25.00"
"""

INVITE = """\
  <send retrans="500">
    <![CDATA[
      INVITE sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: sipp <sip:sipp@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:[service]@[remote_ip]:[remote_port]>
      Call-ID: [call_id]
      CSeq: 1 INVITE
      Contact: sip:sipp@[local_ip]:[local_port]
      Max-Forwards: 70
      Content-Type: application/sdp
      Content-Length: [len]

      v=0
      o=user1 53655765 2353687637 IN IP[local_ip_type] [local_ip]
      s=-
      c=IN IP[media_ip_type] [media_ip]
      t=0 0
      m=audio [media_port] RTP/AVP 0
      a=rtpmap:0 PCMU/8000
    ]]>
  </send>
  <recv response="100" optional="true"/>
  <recv response="180" optional="true"/>
  <recv response="183" optional="true"/>
"""

ACK = """\
  <send>
    <![CDATA[
      ACK sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: sipp <sip:sipp@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      [last_To:]
      Call-ID: [call_id]
      CSeq: 1 ACK
      Contact: sip:sipp@[local_ip]:[local_port]
      Max-Forwards: 70
      Content-Length: 0
    ]]>
  </send>
"""

# the call is refused with one final response (the INVITE transaction's ACK reuses its branch)
REJECTED = """\
<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="rejected with {code}">
{invite}  <recv response="{code}"/>
{ack}</scenario>
""".replace("{ack}", ACK.replace(";branch=[branch]", ";branch=[branch-1]"))

# answered, then cut by Asterisk (Dial's L()): the BYE comes from the network, not from us
CUT = """\
<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="answered, then cut by the network">
{invite}  <recv response="200" rtd="true"/>
{ack}  <recv request="BYE" timeout="30000"/>
  <send>
    <![CDATA[
      SIP/2.0 200 OK
      [last_Via:]
      [last_From:]
      [last_To:]
      [last_Call-ID:]
      [last_CSeq:]
      Content-Length: 0
    ]]>
  </send>
</scenario>
""".replace("{ack}", ACK)


KIND = re.compile(rb"^X-ClickPhone-Kind: ([a-z_]+)\r?$", re.MULTILINE)


SIPP = "sipp <sip:sipp@"  # the From of the scenarios below
MARIA = '"Maria Dobre" <sip:0721000002@'  # a caller from the network, with a name and a number

# the carrier calls a DID with an A-law offer, says sipp's recorded 7 s of speech after the beep
# and hangs up
CALL_IN = """\
<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="a caller leaves a message">
{invite}  <recv response="200" rtd="true"/>
{ack}  <pause milliseconds="500"/>
  <nop><action><exec play_pcap_audio="/usr/share/sip-tester/g711a.pcap"/></action></nop>
  <pause milliseconds="7500"/>
  <send retrans="500">
    <![CDATA[
      BYE sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: sipp <sip:sipp@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      [last_To:]
      Call-ID: [call_id]
      CSeq: 2 BYE
      Contact: sip:sipp@[local_ip]:[local_port]
      Max-Forwards: 70
      Content-Length: 0
    ]]>
  </send>
  <recv response="200"/>
</scenario>
"""
CALL_IN = CALL_IN.replace("{ack}", ACK).replace(
    "{invite}", INVITE.replace("RTP/AVP 0\n", "RTP/AVP 8\n").replace("0 PCMU/8000", "8 PCMA/8000")
)

# acct1001's desk phone: rings, never answers; Asterisk gives up after Dial's 3 s (CANCEL)
NO_ANSWER = """\
<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="rings, nobody answers">
  <recv request="INVITE">
    <action><ereg regexp="CSeq: ([0-9]+)" search_in="msg" assign_to="whole,cseq"/></action>
  </recv>
  <send>
    <![CDATA[
      SIP/2.0 180 Ringing
      [last_Via:]
      [last_From:]
      [last_To:];tag=[pid]SIPpTag01[call_number]
      [last_Call-ID:]
      [last_CSeq:]
      Contact: <sip:[local_ip]:[local_port];transport=[transport]>
      Content-Length: 0
    ]]>
  </send>
  <recv request="CANCEL"/>
  <send>
    <![CDATA[
      SIP/2.0 200 OK
      [last_Via:]
      [last_From:]
      [last_To:];tag=[pid]SIPpTag01[call_number]
      [last_Call-ID:]
      [last_CSeq:]
      Content-Length: 0
    ]]>
  </send>
  <send>
    <![CDATA[
      SIP/2.0 487 Request Terminated
      [last_Via:]
      [last_From:]
      [last_To:];tag=[pid]SIPpTag01[call_number]
      [last_Call-ID:]
      CSeq: [$cseq] INVITE
      Content-Length: 0
    ]]>
  </send>
  <recv request="ACK"/>
  <Reference variables="whole"/>
</scenario>
"""


def plain_text(msg: EmailMessage) -> str:
    body = msg.get_body(("plain",))
    return "" if body is None else str(body.get_content())


class Sink:
    def __init__(self) -> None:
        self.mails: list[Envelope] = []

    def kinds(self) -> list[str]:
        return sorted(m.group(1).decode() for e in self.mails if (m := KIND.search(e.original_content or b"")))

    def mail(self, kind: str) -> EmailMessage | None:
        for envelope in self.mails:
            msg = email.message_from_bytes(envelope.original_content or b"", policy=email.policy.default)
            if isinstance(msg, EmailMessage) and msg["X-ClickPhone-Kind"] == kind:
                return msg
        return None

    async def handle_DATA(self, server: SMTPServer, session: Session, envelope: Envelope) -> str:
        self.mails.append(envelope)
        return "250 2.0.0 Ok: queued"


class Checks:
    def __init__(self) -> None:
        self.failed = 0

    def check(self, name: str, ok: bool, detail: object = "") -> bool:
        self.failed += not ok
        print(f"{'PASS' if ok else 'FAIL'} {name}{f': {detail}' if detail != '' else ''}", flush=True)
        return ok


def wait_for(probe: Callable[[], Any], timeout: float = 20.0) -> Any:
    """``probe()`` once it is truthy, or its last value after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            return value
        time.sleep(0.1)


class Lab:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.root: Path = args.root
        self.repo: Path = args.repo
        self.work = work
        self.cli = [str(self.repo / ".venv" / "bin" / "clickphone-agi")]
        self.config = work / "clickphone-agi.yaml"
        self.db = work / "clickphone-agi.db"
        self.daemon: subprocess.Popen[bytes] | None = None
        self.daemon_log = work / "daemon.log"
        self.sipp_port = 5080
        secret = work / "ami-secret"
        secret.write_text(args.secret + "\n")
        secret.chmod(0o600)
        self.config.write_text(
            "ami:\n  host: 127.0.0.1\n  port: 5038\n  username: clickphone\n"
            f"  secret_file: {secret}\n  backoff_initial: 0.2\n  backoff_max: 1\n"
            "agi:\n  enabled: true\n"
            "smtp:\n  port: 2526\n  retry_min: 1\n"
            f"database:\n  path: {self.db}\n"
            f"asterisk:\n  system_name: pbx1\n  voicemail_spool: {self.root}/var/spool/asterisk/voicemail\n"
            f"  fax_spool: {self.root}/var/spool/asterisk/fax\n"
            f"  master_csv: {self.root}/var/log/asterisk/cdr-csv/Master.csv\n"
            "  reconcile_interval: 2\n"
            f"billing:\n  tariffs_file: {self.repo}/etc/tariffs.yaml\n"
            "  billing_cdr:\n    destination_contexts: [clickphone-outbound]\n"
            "notifications:\n  inbound_contexts: [from-trunk]\n  missed_call_grace: 1\n"
            f"daemon:\n  control_socket: {work}/control.sock\n"
            "logging:\n  format: json\n"
        )

    def asterisk(self, command: str) -> str:
        """A CLI command to the Asterisk of this run (the process whose root is the run's tree)."""
        tree = os.stat(self.root)
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit() and (proc / "comm").exists():
                try:
                    root = os.stat(proc / "root")  # readlink says "/" inside nspawn: compare the inodes
                    if (proc / "comm").read_text().strip() == "asterisk" and (root.st_dev, root.st_ino) == (
                        tree.st_dev,
                        tree.st_ino,
                    ):
                        argv = ["nsenter", "-t", proc.name, "-m", "--", "asterisk", "-rx", command]
                        return subprocess.run(argv, capture_output=True, text=True, check=False).stdout
                except OSError:
                    continue
        raise RuntimeError(f"no Asterisk runs in {self.root}")

    def run_cli(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.cli, *argv, "-c", str(self.config)], capture_output=True, text=True, check=False)

    def start_daemon(self, *options: str) -> None:
        log = self.daemon_log.open("ab")
        argv = [*self.cli, "run", "-c", str(self.config), *options]
        self.daemon = subprocess.Popen(argv, stdout=log, stderr=log)

    def stop_daemon(self) -> int:
        assert self.daemon is not None
        self.daemon.send_signal(signal.SIGTERM)
        code = self.daemon.wait(30)
        self.daemon = None
        return code

    def status(self) -> dict[str, Any]:
        done = self.run_cli("status", "--json")
        try:
            parsed: dict[str, Any] = json.loads(done.stdout)
        except ValueError:
            return {}
        return parsed

    def ami_connected(self) -> bool:
        ami = self.status().get("ami") or {}
        return bool(ami.get("connected"))

    def rows(self, sql: str, *params: object) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def sipp(
        self,
        source: str,
        number: str,
        *,
        scenario: str | None = None,
        hold_ms: int = 2000,
        caller: str = SIPP,
        remote: str = "127.0.0.1:5060",
    ) -> subprocess.Popen[bytes]:
        """One call from ``source`` (its own address: PJSIP identifies the endpoint by it)."""
        self.sipp_port += 1
        argv = ["sipp", "-i", source, "-p", str(self.sipp_port), "-s", number, "-m", "1", "-timeout", "40s"]
        argv += ["-nostdin", "-trace_err", "-error_file", str(self.work / f"sipp-{self.sipp_port}.err")]
        if scenario is None:
            argv += ["-sn", "uac", "-d", str(hold_ms)]
        else:
            path = self.work / f"scenario-{self.sipp_port}.xml"
            path.write_text(scenario.replace("{invite}", INVITE).replace(SIPP, caller))
            argv += ["-sf", str(path)]
        out = (self.work / f"sipp-{self.sipp_port}.out").open("wb")
        return subprocess.Popen([*argv, remote], stdout=out, stderr=subprocess.STDOUT)

    def call(self, source: str, number: str, **kwargs: Any) -> int:
        return self.sipp(source, number, **kwargs).wait(60)

    def calls_of(self, account: str) -> list[tuple[Any, ...]]:
        return self.rows(
            "SELECT c.destination, c.billable_seconds, c.disposition, c.destination_context, l.amount"
            " FROM cdrs c JOIN ledger l ON l.ref = c.key WHERE c.account = ? AND l.kind = 'call' ORDER BY l.id",
            account,
        )

    def cost(self, number: str, seconds: int) -> int:
        """What ``tariffs rate`` says the call costs, in bani."""
        done = self.run_cli("tariffs", "rate", number, str(seconds))
        return int(json.loads(done.stdout)["cost_bani"])


def main(args: argparse.Namespace) -> int:
    checks = Checks()
    keep = bool(os.environ.get("KEEP"))
    work = Path(tempfile.mkdtemp(prefix="cpagi-live-"))
    lab = Lab(args, work)
    sink = Sink()
    smtp = Controller(sink, hostname="127.0.0.1", port=2526)
    smtp.start()
    carrier = subprocess.Popen(
        ["sipp", "-sn", "uas", "-i", "127.0.0.3", "-p", "5070", "-nostdin"],
        stdout=(work / "carrier.out").open("wb"),
        stderr=subprocess.STDOUT,
    )
    second_phone = subprocess.Popen(
        ["sipp", "-sn", "uas", "-i", "127.0.0.7", "-p", "5091", "-nostdin"],
        stdout=(work / "second-phone.out").open("wb"),
        stderr=subprocess.STDOUT,
    )
    (work / "desk-phone.xml").write_text(NO_ANSWER)
    desk_phone = subprocess.Popen(
        ["sipp", "-sf", str(work / "desk-phone.xml"), "-i", "127.0.0.6", "-p", "5090", "-nostdin"],
        stdout=(work / "desk-phone.out").open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        return run_checks(checks, lab, sink)
    finally:
        if lab.daemon is not None:
            lab.daemon.kill()
        carrier.kill()
        desk_phone.kill()
        second_phone.kill()
        smtp.stop()
        if checks.failed:
            print("---- daemon log (last 40 lines)")
            print("\n".join(lab.daemon_log.read_text(errors="replace").splitlines()[-40:]))
            full = args.root / "var/log/asterisk/full"
            if full.exists():
                print("---- Asterisk's log (last 60 lines)")
                print("\n".join(full.read_text(errors="replace").splitlines()[-60:]))
            for err in sorted(work.glob("sipp-*.err")):
                if err.stat().st_size:
                    print(f"---- {err.name}\n{err.read_text(errors='replace')[-1500:]}")
        if keep:
            print(f"KEEP: the daemon's files stay in {work}")
        else:
            shutil.rmtree(work)


def run_checks(checks: Checks, lab: Lab, sink: Sink) -> int:
    check = checks.check
    for argv in (("db", "migrate"), ("accounts", "import", str(lab.work / "accounts.yaml"))):
        if argv[0] == "accounts":
            (lab.work / "accounts.yaml").write_text(ACCOUNTS)
        done = lab.run_cli(*argv)
        if not check(f"clickphone-agi {' '.join(argv[:2])}", done.returncode == 0, done.stderr.strip()):
            return checks.failed

    lab.start_daemon()
    check(
        "AMI: the daemon logs in with the README's user (read = system,call,cdr,user; write = nothing)",
        wait_for(lab.ami_connected, 30),
    )

    # 1. an ordinary call, answered by the carrier, hung up by the caller after 2 s
    code = lab.call("127.0.0.2", "0212345678", hold_ms=2000)
    check("ALLOW: acct1001 calls 0212345678 from its allowed address, the carrier answers", code == 0, f"sipp {code}")
    rated = wait_for(lambda: lab.calls_of("acct1001"))
    if check("the call's CDR comes back over AMI and is charged once", len(rated) == 1, rated):
        dest, billsec, disposition, context, amount = rated[0]
        check(
            "charged what `tariffs rate` says for its billable seconds",
            -amount == lab.cost(dest, billsec) and 1 <= billsec <= 3 and disposition == "ANSWERED",
            f"{dest} {billsec} s {disposition} in {context}: {amount} bani",
        )
    held = lab.rows("SELECT COUNT(*) FROM reservations")
    check("its reservation is released by the CDR", held == [(0,)], held)

    # 2. MAXSEC: acct1002 may talk 4 s (max_call_seconds); the carrier never hangs up, Dial's L() does
    started = time.monotonic()
    code = lab.call("127.0.0.5", "0212345679", scenario=CUT)
    took = time.monotonic() - started
    check(
        "ALLOW with MAXSEC 4: Asterisk itself ends the call (BYE to the caller)",
        code == 0,
        f"sipp {code}, {took:.1f} s",
    )
    rated = wait_for(lambda: lab.calls_of("acct1002"))
    if check("the cut call is charged once", len(rated) == 1, rated):
        dest, billsec, _, _, amount = rated[0]
        check(
            "it lasted no longer than MAXSEC, charged as rated",
            3 <= billsec <= 4 and -amount == lab.cost(dest, billsec),
            f"{billsec} s billable, {amount} bani",
        )

    # 3. DENY, each with the dialplan's hangup cause as the SIP caller sees it
    denials = [
        ("127.0.0.4", "0212345678", 403, "ip_not_allowed: acct1001 from an address not on its list"),
        ("127.0.0.2", "0900123456", 403, "blocked_class: acct1001 may not call premium numbers"),
        ("127.0.0.2", "0991234567", 404, "no_route: no tariff for the number"),
        ("127.0.0.2", "0212a45678", 484, "not digits only: refused before the AGI"),
    ]
    for source, number, status, what in denials:
        code = lab.call(source, number, scenario=REJECTED.replace("{code}", str(status)))
        check(f"DENY {what} -> SIP {status}", code == 0, f"sipp {code}")
    dialled = wait_for(lambda: lab.rows("SELECT destination FROM cdrs WHERE disposition != 'ANSWERED'"))
    check(
        "the refused calls' CDRs keep the numbers dialled (fraud reviews need them)",
        sorted(d for (d,) in dialled) == sorted(number for _, number, _, _ in denials),
        dialled,
    )
    alert = wait_for(lambda: lab.rows("SELECT kind, recipient FROM outbox WHERE kind = 'ip_denied'"), 10)
    check(
        "the refused address raised a security alert to the account",
        alert == [("ip_denied", "ion.popescu@example.ro")],
        alert,
    )

    # 4. too_many_calls: acct1001 may have one call at a time
    first = lab.sipp("127.0.0.2", "0212345678", hold_ms=5000)
    time.sleep(1.5)
    code = lab.call("127.0.0.2", "0212345670", scenario=REJECTED.replace("{code}", "503"))
    check("DENY too_many_calls: a second call while the first talks -> SIP 503", code == 0, f"sipp {code}")
    code = first.wait(30)
    check("the first call goes on and ends normally", code == 0, f"sipp {code}")
    rated = wait_for(lambda: len(lab.calls_of("acct1001")) == 2 and lab.calls_of("acct1001"))
    check("acct1001 is charged for its two answered calls, nothing for the refused ones", len(rated or []) == 2, rated)

    # calls in from the carrier: a voicemail left (real app_voicemail, real spool) and a missed call
    code = lab.call("127.0.0.3", "0212345601", scenario=REJECTED.replace("{code}", "603"), caller=MARIA)
    check("a call to acct1001's second DID rings 3 s, unanswered (SIP 603)", code == 0, f"sipp {code}")
    code = lab.call("127.0.0.3", "0212345600", scenario=CALL_IN, caller=MARIA)
    check("a call to its first DID goes to voicemail 100@default and leaves a 7 s message", code == 0, f"sipp {code}")
    inbox = lab.root / "var/spool/asterisk/voicemail/default/100/INBOX"
    listed = sorted(os.listdir(inbox)) if inbox.exists() else "no INBOX"
    check("Asterisk wrote the message to the spool", (inbox / "msg0000.txt").exists(), listed)
    mails = wait_for(lambda: {"voicemail", "missed_call"} <= set(sink.kinds()) and sink.kinds(), 30)
    expected = ["ip_denied", "missed_call", "voicemail"]
    check("one voicemail and one missed-call mail, nothing else so far", sorted(mails or []) == expected, mails)
    voicemail = sink.mail("voicemail")
    if voicemail is not None:
        audio = [(p.get_content_type(), len(p.get_payload(decode=True) or b"")) for p in voicemail.iter_attachments()]
        check(
            "the voicemail mail carries the recording (WAV: 16 KB a second of 8 kHz audio, 6-8 s)",
            len(audio) == 1 and audio[0][0] in {"audio/wav", "audio/x-wav"} and 96_000 < audio[0][1] < 130_000,
            audio,
        )
        check(
            "to the account's address, naming the caller",
            voicemail["To"] == "ion.popescu@example.ro" and "0721000002" in plain_text(voicemail),
            voicemail["To"],
        )
    missed = sink.mail("missed_call")
    if missed is not None:
        check("the missed-call mail names the caller", "0721000002" in plain_text(missed), missed["Subject"])
    # a ring group (Queue, ringall): the first phone never answers, the second does: not missed
    code = lab.call("127.0.0.3", "0212345603", hold_ms=2000)
    check("a call to the ring group is answered by the second desk phone", code == 0, f"sipp {code}")
    answered = wait_for(
        lambda: (
            lab.rows("SELECT COUNT(*) FROM cdrs WHERE destination = '0212345603' AND disposition = 'ANSWERED'")
            == [(1,)]
        ),
        15,
    )
    time.sleep(3)  # notifications.missed_call_grace is 1 s here: a wrong decision would be mailed by now
    check(
        "a ring-group call answered by one member is not mailed as missed",
        answered and sink.kinds().count("missed_call") == 1,
        f"answered CDR: {answered}, mails: {sink.kinds()}",
    )

    # a fax in and the same fax out, through the real res_fax_spandsp and the shipped fax snippets
    lab.asterisk("channel originate Local/0212345602@lab-fax-in/n extension send@lab-fax-out")
    faxes = wait_for(lambda: {"fax_received", "fax_sent"} <= set(sink.kinds()) and sink.kinds(), 120)
    check(
        "a fax received and a fax sent: one mail each",
        sorted(faxes or []).count("fax_received") == 1 and sorted(faxes or []).count("fax_sent") == 1,
        faxes,
    )
    spool = lab.root / "var/spool/asterisk/fax"
    sidecars = sorted(spool.glob("rx-*.tif.result"))
    text = sidecars[0].read_text() if len(sidecars) == 1 else ""
    check(
        "the hangup handler wrote the received fax's sidecar: status, pages, ending end=1",
        "status=SUCCESS\n" in text and "\npages=" in text and text.endswith("end=1\n"),
        text.replace("\n", " ")[-160:] or sidecars,
    )
    received = sink.mail("fax_received")
    if received is not None:
        pdfs = [
            bytes(p.get_payload(decode=True) or b"")
            for p in received.iter_attachments()
            if p.get_content_type() == "application/pdf"
        ]
        check(
            "the fax-received mail carries the pages as a PDF",
            len(pdfs) == 1 and pdfs[0].startswith(b"%PDF-"),
            [len(p) for p in pdfs],
        )
    charged = lab.rows("SELECT COUNT(*) FROM ledger WHERE kind = 'call'")
    check("calls in, rung or to voicemail, and fax legs are never charged", charged == [(3,)], charged)

    # acct1003 calls over IPv6: remote_addr is "[::1]:port", which the dialplan must not cut on ":"
    code = lab.call("::1", "0212345678", hold_ms=1000, remote="[::1]:5060")
    check("ALLOW over IPv6: acct1003 from ::1, on its list, gets through", code == 0, f"sipp {code}")
    full = (lab.root / "var/log/asterisk/full").read_text(errors="replace")
    asked = [line.split('", "', 1)[-1] for line in full.splitlines() if "AGI(" in line and ",acct1003," in line]
    check(
        "the dialplan passed the source address as ::1 (not '[' or a port)",
        len(asked) == 1 and asked[0].endswith(',acct1003,0212345678,::1") in new stack'),
        asked,
    )
    rated = wait_for(lambda: lab.calls_of("acct1003"))
    check("and the call is charged once", len(rated) == 1, rated)

    agi = lab.status().get("agi") or {}
    figures = {k: agi.get(k) for k in ("sessions", "completed", "header_errors", "protocol_errors", "timeouts")}
    check(
        "FastAGI: 8 sessions with Asterisk's res_agi, each completed, no header or protocol error",
        figures == {"sessions": 8, "completed": 8, "header_errors": 0, "protocol_errors": 0, "timeouts": 0},
        figures,
    )

    # 5. the daemon down: fail closed, except emergency numbers
    code = lab.stop_daemon()
    check("the daemon stops cleanly (SIGTERM)", code == 0, f"exit {code}")
    code = lab.call("127.0.0.2", "0212345678", scenario=REJECTED.replace("{code}", "503"))
    check("daemon down: AGISTATUS FAILURE, the call fails closed -> SIP 503", code == 0, f"sipp {code}")
    code = lab.call("127.0.0.2", "112", hold_ms=1000)
    check("daemon down: 112 is still connected (dialled before any AGI)", code == 0, f"sipp {code}")
    # a fax arrives meanwhile: only the TIFF and the hangup handler's sidecar tell of it
    spool = lab.root / "var/spool/asterisk/fax"
    lab.asterisk("channel originate Local/0212345602@lab-fax-in/n extension send@lab-fax-out")

    def complete_sidecars() -> list[Path]:
        found = [p for p in spool.glob("rx-*.tif.result") if p.read_text().endswith("end=1\n")]
        return found if len(found) == 2 else []

    sidecars = wait_for(complete_sidecars, 90)
    check("daemon down: a second fax is received; its sidecar is complete", len(sidecars) == 2, sidecars)
    time.sleep(1)  # Asterisk writes the calls' rows to Master.csv

    # 6. back up: what AMI carried while it was down comes from Master.csv, charged never twice
    lab.start_daemon()
    check("restarted, the daemon logs in again", wait_for(lab.ami_connected, 30))
    recovered = wait_for(lambda: (lab.status().get("reconcile") or {}).get("recovered", 0), 20)
    check("the calls made while it was down are recovered from Master.csv", bool(recovered), f"{recovered} CDRs")
    emergency = lab.rows("SELECT COUNT(*) FROM cdrs WHERE destination = '112'")
    check("the 112 call is recorded", emergency == [(1,)], emergency)
    received = wait_for(lambda: sink.kinds().count("fax_received") == 2 and sink.kinds(), 30)
    check("the fax received while it was down is found in the spool and mailed", bool(received), sink.kinds())
    charged = lab.rows("SELECT COUNT(*) FROM ledger WHERE kind = 'call'")
    check("and never charged; no call charged twice", charged == [(4,)], charged)
    done = lab.run_cli("accounts", "check")
    check("every balance equals its ledger's sum (accounts check)", done.returncode == 0, done.stdout.strip()[-200:])
    skews = lab.daemon_log.read_text().count('"ami.cdr_clock_skew"')
    check("Asterisk's zone and asterisk.timezone agree: no ami.cdr_clock_skew", skews == 0, f"{skews} warnings")

    # Asterisk restarts under the running daemon: it reconnects and the next call is charged
    connects = (lab.status().get("ami") or {}).get("connects", 0)
    lab.asterisk("core restart now")
    back = wait_for(lambda: lab.ami_connected() and (lab.status().get("ami") or {}).get("connects", 0) > connects, 60)
    check("Asterisk restarted ('core restart now'): the daemon logs in again", bool(back), lab.status().get("ami"))
    code = lab.call("127.0.0.2", "0212345678", hold_ms=1000)
    rated = wait_for(lambda: len(lab.calls_of("acct1001")) == 3 and lab.calls_of("acct1001"))
    check("and the first call after it is charged once", code == 0 and bool(rated), f"sipp {code}, {rated}")
    code = lab.stop_daemon()
    check("the daemon stops cleanly again", code == 0, f"exit {code}")

    # 7. asterisk.timezone set wrong (UTC; Asterisk runs on Bucharest time): the daemon says so
    lab.start_daemon("--set", "asterisk.timezone=Etc/UTC")
    wait_for(lab.ami_connected, 30)
    code = lab.call("127.0.0.2", "0212345678", hold_ms=1000)
    skew = wait_for(lambda: lab.status().get("cdr_clock_skew_seconds"), 15)
    offset = -round(datetime.now(ZoneInfo("Europe/Bucharest")).utcoffset().total_seconds())  # type: ignore[union-attr]
    check(
        "a wrong asterisk.timezone shows: status' cdr_clock_skew_seconds is minus Bucharest's offset",
        code == 0 and isinstance(skew, int) and abs(skew - offset) < 60,
        f"sipp {code}, skew {skew} s, expected {offset}",
    )
    warned = lab.daemon_log.read_text().count('"ami.cdr_clock_skew"')
    check("and the log says it once (ami.cdr_clock_skew)", warned == 1, f"{warned} warnings")
    code = lab.stop_daemon()
    check("the daemon stops cleanly a third time", code == 0, f"exit {code}")

    # 8. voicemail_remove_after_send: refused with the least-privilege user ('write =' nothing),
    # then with the README's 'write = user' Asterisk's own VoicemailRemove empties the box
    inbox = lab.root / "var/spool/asterisk/voicemail/default/100/INBOX"
    lab.start_daemon("--set", "notifications.voicemail_remove_after_send=true")
    wait_for(lab.ami_connected, 30)
    refused = wait_for(
        lambda: [line for line in lab.daemon_log.read_text().splitlines() if '"voicemail.remove_failed"' in line], 20
    )
    check(
        "with 'write =' (nothing) Asterisk refuses VoicemailRemove; the daemon says why, the box stays",
        len(refused) == 1
        and '"Permission denied"' in refused[0]
        and "write = user" in refused[0]
        and bool(list(inbox.glob("msg0000.*"))),
        [line[:300] for line in refused],
    )
    code = lab.stop_daemon()
    check("the daemon stops cleanly a fourth time", code == 0, f"exit {code}")
    manager = lab.root / "etc/asterisk/manager.conf"
    manager.write_text(manager.read_text().replace("\nwrite =\n", "\nwrite = user\n"))
    lab.asterisk("manager reload")
    lab.start_daemon("--set", "notifications.voicemail_remove_after_send=true")
    wait_for(lab.ami_connected, 30)
    emptied = wait_for(lambda: inbox.exists() and not list(inbox.glob("msg*")), 30)
    check(
        "the message mailed earlier is removed by VoicemailRemove at the start-up scan",
        bool(emptied),
        sorted(os.listdir(inbox)),
    )
    code = lab.call("127.0.0.3", "0212345600", scenario=CALL_IN, caller=MARIA)
    mailed = wait_for(lambda: sink.kinds().count("voicemail") == 2, 30)
    emptied = wait_for(lambda: not list(inbox.glob("msg*")), 30)
    check(
        "a new message is mailed, then removed from the box",
        code == 0 and bool(mailed) and bool(emptied),
        f"sipp {code}, mails {sink.kinds().count('voicemail')}, box {sorted(os.listdir(inbox))}",
    )
    code = lab.stop_daemon()
    check("the daemon stops cleanly a fifth time", code == 0, f"exit {code}")
    kinds = sink.kinds()
    check("the security alert was mailed", "ip_denied" in kinds, kinds)
    return checks.failed


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, required=True, help="the container's root directory")
    parser.add_argument("--secret", required=True, help="the AMI secret run.sh wrote into manager.conf")
    parser.add_argument("--repo", type=Path, required=True)
    os.umask(0o077)
    sys.exit(min(main(parser.parse_args()), 100))
