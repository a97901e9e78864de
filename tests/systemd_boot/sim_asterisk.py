"""The Asterisk side of ``tests/systemd_boot/run.sh``, run as root inside the booted container.

Started before the unit: an SMTP sink on 127.0.0.1:2525 and the AMI replay server on
127.0.0.1:5038 (the lab's recorded Asterisk 22 sessions). Once the daemon under systemd has
logged in it plays an answered call, a missed call, a voicemail and a fax, asks FastAGI
``authorize`` twice, waits for the mail and prints one ``PASS``/``FAIL`` line per check; the
exit status is the number of failures. Not collected by pytest (no ``test_`` prefix).
"""

from __future__ import annotations

import argparse
import asyncio
import email
import email.policy
from pathlib import Path

from aiosmtpd.smtp import SMTP

from clickphone_agi.sim.agi_client import AgiCallResult, agi_call
from clickphone_agi.sim.ami_server import AmiReplayServer, load_transcript, packaged_scenarios
from clickphone_agi.sim.smtp_sink import Received, SinkHandler

RECIPIENT = "ion.popescu@example.ro"
SCENARIOS = ("answered_call", "missed_call", "voicemail", "fax")
EXPECTED_MAILS = 4  # the voicemail (audio), the fax (PDF), the missed call, the IP alert


def _attachments(mail: Received) -> list[tuple[str, bytes]]:
    msg = email.message_from_bytes(mail.data, policy=email.policy.default)
    found = []
    for part in msg.walk():
        if part.get_filename():
            payload = part.get_payload(decode=True)
            found.append((part.get_content_type(), payload if isinstance(payload, bytes) else b""))
    return found


async def _authorize(source_ip: str, uniqueid: str) -> AgiCallResult:
    """The dialplan's question before acct1001 dials a Bucharest number (FastAGI on 4573)."""
    args = ["acct1001", "0212345678", source_ip]
    return await agi_call("127.0.0.1", 4573, "authorize", args, {"uniqueid": uniqueid})


class Checks:
    def __init__(self) -> None:
        self.failed = 0

    def check(self, name: str, ok: bool, detail: object = "") -> None:
        self.failed += not ok
        print(f"{'PASS' if ok else 'FAIL'} {name}{f': {detail}' if detail else ''}", flush=True)


async def main(args: argparse.Namespace) -> int:
    checks = Checks()
    loop = asyncio.get_running_loop()
    handler = SinkHandler(args.mail)
    smtp = await loop.create_server(lambda: SMTP(handler, hostname="sink.local", loop=loop), "127.0.0.1", 2525)
    ami = AmiReplayServer("clickphone", args.secret, port=5038)
    await ami.start()
    args.ready.write_text("ready\n", encoding="utf-8")  # run.sh starts the unit now
    try:
        await ami.wait_for_login(args.timeout)
        checks.check("daemon logged in to the AMI", True)
    except TimeoutError:
        checks.check("daemon logged in to the AMI", False, f"no login within {args.timeout} s")
        return checks.failed
    scenarios = {name: load_transcript(path) for name, path in packaged_scenarios().items()}
    for name in SCENARIOS:
        await ami.play(scenarios[name])
        await asyncio.sleep(0.5)
    allow = await _authorize("127.0.0.1", "sd.1")
    checks.check(
        "authorize from an allowed IP: ALLOW with MAXSEC",
        allow.variables.get("CLICKPHONE_AUTH") == "ALLOW" and int(allow.variables.get("CLICKPHONE_MAXSEC", "0")) > 0,
        allow.variables,
    )
    deny = await _authorize("203.0.113.7", "sd.2")
    checks.check(
        "authorize from another IP: DENY ip_not_allowed",
        deny.variables.get("CLICKPHONE_AUTH") == "DENY" and deny.variables.get("CLICKPHONE_REASON") == "ip_not_allowed",
        deny.variables,
    )
    try:
        async with asyncio.timeout(args.timeout):
            while len(handler.messages) < EXPECTED_MAILS:
                handler.changed.clear()
                await handler.changed.wait()
    except TimeoutError:
        pass
    await asyncio.sleep(3)  # nothing more (a second copy) may come
    mails = handler.messages
    subjects = [str(email.message_from_bytes(m.data, policy=email.policy.default)["Subject"]) for m in mails]
    checks.check(f"{EXPECTED_MAILS} mails, each once", len(mails) == EXPECTED_MAILS, subjects)
    checks.check("every mail to the account's address", all(m.rcpt_tos == (RECIPIENT,) for m in mails))
    kinds = [a for m in mails for a in _attachments(m)]
    pdfs = [data for ctype, data in kinds if ctype == "application/pdf"]
    checks.check(
        "the received fax mailed as a PDF (converted in the worker process, under the unit's sandbox)",
        len(pdfs) == 1 and pdfs[0].startswith(b"%PDF-"),
        [(ctype, len(data)) for ctype, data in kinds],
    )
    audio = [data for ctype, data in kinds if ctype.startswith("audio/")]
    checks.check("the voicemail mailed with its audio", len(audio) == 1 and audio[0][:4] == b"RIFF")
    await ami.close()
    smtp.close()
    return checks.failed


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--secret", required=True)
    parser.add_argument("--mail", type=Path, required=True, help="folder for the received .eml files")
    parser.add_argument("--ready", type=Path, required=True, help="file written once both servers listen")
    parser.add_argument("--timeout", type=float, default=90.0)
    raise SystemExit(asyncio.run(main(parser.parse_args())))
