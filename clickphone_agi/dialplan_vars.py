"""Every name the daemon shares with ``dialplan/``: channel variables, their values, UserEvent
names and AGI script names. The one place to change them.

The ``.conf`` files spell these names literally (the dialplan cannot import Python), so
``tests/test_agi.py`` parses ``dialplan/*.conf`` and fails when a ``CLICKPHONE_*`` variable or a
``ClickPhone*`` UserEvent used there is missing here, or when a :class:`Reason` has no
``CLICKPHONE_CAUSE_<reason>`` hangup cause in its ``[globals]``.

Variables read by the dialplan after ``AGI(agi://127.0.0.1:4573/authorize,...)``
(``dialplan/clickphone-outbound.conf``):

* :data:`AUTH`: :data:`ALLOW` or :data:`DENY`. Anything else, including unset, means the
  authorisation did not happen and the dialplan fails closed. (A FastAGI server that closes the
  connection early still leaves ``AGISTATUS=SUCCESS``, so the dialplan clears these variables
  before the AGI call and tests ``AUTH`` itself.)
* :data:`REASON`: a :class:`Reason` value; with :data:`DENY` it selects the hangup cause, the
  global ``CLICKPHONE_CAUSE_<reason>`` (:data:`CAUSE_PREFIX`).
* :data:`MAXSEC`: with :data:`ALLOW`, the longest the call may last, in whole seconds, ``>= 1``.
  The dialplan turns it into ``Dial(...,L(<ms>))`` and fails closed when it is not a positive
  integer (``L(0)`` makes Dial hang up, and "no limit" is never what an exhausted balance means).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

__all__ = [
    "ALLOW",
    "AUTH",
    "AUTHORIZE_SCRIPT",
    "CAUSE_PREFIX",
    "DENY",
    "FAX_FILE",
    "FAX_RESULT_EVENT",
    "FAX_SPOOL",
    "MAXSEC",
    "REASON",
    "VOICEMAIL_EVENT",
    "Reason",
]

# -- outbound authorisation (clickphone-outbound.conf) ------------------------------------------

AUTHORIZE_SCRIPT: Final = "authorize"
"""FastAGI script name: ``AGI(agi://127.0.0.1:4573/authorize,<accountcode>,<number>,<source ip>)``."""

AUTH: Final = "CLICKPHONE_AUTH"
REASON: Final = "CLICKPHONE_REASON"
MAXSEC: Final = "CLICKPHONE_MAXSEC"

ALLOW: Final = "ALLOW"
DENY: Final = "DENY"
CAUSE_PREFIX: Final = "CLICKPHONE_CAUSE_"
"""Dialplan globals ``CLICKPHONE_CAUSE_<reason>``: the hangup cause of a DENY for that :class:`Reason`."""


class Reason(StrEnum):
    """Why a call was allowed or denied; the value of :data:`REASON`.

    Each value has a hangup cause, the global ``CLICKPHONE_CAUSE_<value>`` in the dialplan.
    """

    NO_ACCOUNT = "no_account"
    NO_CREDIT = "no_credit"
    DAILY_LIMIT = "daily_limit"
    IP_NOT_ALLOWED = "ip_not_allowed"
    NO_ROUTE = "no_route"
    BLOCKED_CLASS = "blocked_class"
    TOO_MANY_CALLS = "too_many_calls"
    DISABLED = "disabled"
    ERROR = "error"
    """Internal failure while deciding: the dialplan fails closed."""
    EMERGENCY = "emergency"
    """Allowed whatever the balance. Sent with :data:`ALLOW` (and a :data:`MAXSEC`)."""


# -- fax and voicemail snippets (clickphone-fax.conf, clickphone-voicemail.conf) ----------------

FAX_RESULT_EVENT: Final = "ClickPhoneFaxResult"
"""``UserEvent`` the fax hangup handler sends with FAXSTATUS, FAXPAGES, FileName, ..."""

VOICEMAIL_EVENT: Final = "ClickPhoneVoicemail"
"""``UserEvent`` the voicemail hangup handler sends with Mailbox and MessageFile."""

FAX_FILE: Final = "CLICKPHONE_FAXFILE"
"""Channel variable holding the TIFF path; set it before ``Goto(clickphone-fax-tx,send,1)``."""

FAX_SPOOL: Final = "CLICKPHONE_FAX_SPOOL"
"""Global holding the directory received faxes are written to (the daemon scans the same one)."""
