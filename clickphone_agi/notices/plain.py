"""Plain-text rendering of the money notices decided inside transactions (ro/en).

Deliberately small: the Email issue replaces it with the Jinja2 templates. Every header value is
built with the email package (addresses via ``headerregistry.Address``); payload text that came
from outside (a dialled number, a source IP) is stripped of control characters first.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from email.message import EmailMessage
from email.utils import format_datetime
from typing import Any

from clickphone_agi.adapters.mail import parse_address
from clickphone_agi.domain.ami_translate import clean_text
from clickphone_agi.domain.delivery import message_id

SUBJECTS = {
    "daily_limit": {
        "ro": "Limita zilnică de cheltuieli: {percent}% atinsă",
        "en": "Daily spend limit: {percent}% reached",
    },
    "low_balance": {"ro": "Credit scăzut: {balance}", "en": "Low credit: {balance}"},
    "insufficient_funds": {"ro": "Apel refuzat: fonduri insuficiente", "en": "Call refused: insufficient funds"},
    "ip_denied": {
        "ro": "Alertă de securitate: apel refuzat de la o adresă IP neautorizată",
        "en": "Security alert: call refused from an unauthorised IP address",
    },
}
BODIES = {
    "daily_limit": {
        "ro": "Bună ziua, {name},\n\nAți cheltuit azi ({day}) {spent}, adică {percent}% din limita zilnică"
        " de {limit}.\nLa 100% apelurile taxabile sunt oprite până mâine.\n",
        "en": "Hello {name},\n\nYou have spent {spent} today ({day}), {percent}% of your daily limit of {limit}.\n"
        "At 100% chargeable calls are stopped until tomorrow.\n",
    },
    "low_balance": {
        "ro": "Bună ziua, {name},\n\nCreditul contului a scăzut la {balance} (pragul de avertizare: {threshold}).\n",
        "en": "Hello {name},\n\nYour account credit is down to {balance} (warning threshold: {threshold}).\n",
    },
    "insufficient_funds": {
        "ro": "Bună ziua, {name},\n\nUn apel către {number} a fost refuzat ({reason}). Credit: {balance}.\n",
        "en": "Hello {name},\n\nA call to {number} was refused ({reason}). Credit: {balance}.\n",
    },
    "ip_denied": {
        "ro": "Bună ziua, {name},\n\nUn apel către {number} de la adresa IP {source_ip} ({at}) a fost refuzat:"
        " adresa nu este în lista celor permise pentru contul dumneavoastră.\n"
        "Dacă nu ați fost dumneavoastră, schimbați parola.\n",
        "en": "Hello {name},\n\nA call to {number} from IP address {source_ip} ({at}) was refused: the address is not"
        " on your account's allow-list. If this was not you, change your password.\n",
    },
}


def render_notice(
    kind: str, payload: Mapping[str, Any], *, key: str, sender: str, recipient: str, domain: str, now: datetime
) -> bytes:
    lang = "en" if payload.get("language") == "en" else "ro"
    safe = {k: clean_text(str(v), 200) for k, v in payload.items()}
    msg = EmailMessage()
    msg["From"] = parse_address(sender)
    msg["To"] = parse_address(recipient)
    msg["Subject"] = SUBJECTS[kind][lang].format_map(safe)
    msg["Date"] = format_datetime(now)
    msg["Message-ID"] = message_id(key, domain)
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(BODIES[kind][lang].format_map(safe))
    return msg.as_bytes()
