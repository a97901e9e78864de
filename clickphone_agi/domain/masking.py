"""Masking of personal data (phone numbers, email addresses) and secrets.

Phone numbers and email addresses are personal data (GDPR), so anything that
lands in a log line is passed through these functions first.  They are pure:
stdlib :mod:`re` only, no I/O, no logging import; the structlog processor that
applies them lives in :mod:`clickphone_agi.adapters.logging`.

Rules (each one is tested in ``tests/test_masking.py``):

* **Phone number** (:func:`mask_phone`): an optional ``+`` then *n* ASCII
  digits.  ``n <= 5`` is an internal extension or short code (``100``,
  ``1001``, ``112``) and is not personal: unchanged.  Otherwise the last 3
  digits are kept, the first ``min(5, n - 6)`` digits are kept (so at least 3
  digits are always hidden, and never more than 5 leading digits are shown),
  and every hidden digit becomes one ``*`` (the length is preserved)::

      0721000001     -> 0721***001
      +40721000001   -> +40721***001
      0040212345678  -> 00402*****678

* **Email address** (:func:`mask_email`): the local part keeps its first 2
  characters (1 if it is 2 characters or shorter) followed by ``…``; the
  domain is kept: ``ion.popescu@example.ro -> io…@example.ro``.

* **Free text** (:func:`mask_text`), scanned left to right:

  - email addresses are masked as above (this also covers a phone number used
    as a local part, ``0721000001@example.ro -> 07…@example.ro``);
  - Asterisk uniqueids / linkedids and epoch timestamps, ``[1-9]`` then 9
    digits, ``.``, digits (``1795882891.0``), are left alone.  National
    numbers start with ``0``, so ``0721000001.5`` is still masked;
  - the 8 hex digit sequence number that Asterisk appends to a channel name
    after a ``-`` (``PJSIP/100-00000012``, ``Local/...@ctx-00000000;1``) is
    left alone;
  - any other run of 6 or more ASCII digits, with an optional leading ``+``,
    that is not glued to a letter or digit on either side is a phone number
    and goes through :func:`mask_phone`.  ``Local/0040212345678@lab-out``
    becomes ``Local/00402*****678@lab-out``.  Digit runs inside words (hex
    ids, hashes such as ``ab12345678cd``) are left alone, as are numbers
    written with spaces or dashes inside (``0721 000 001``): not detected.

* **Secrets** (:func:`redact_mapping`): a key whose name contains ``secret``,
  ``password``, ``passwd``, ``passphrase``, ``token`` or ``authorization``
  (case-insensitive substring), or has ``pin`` / ``pincode`` as a word of its
  own (``pin``, ``voicemail_pin``, ``vmPin``, ``PIN``; but not ``ping`` or
  ``mapping``), has its whole value replaced by ``'***'``, at any depth.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

__all__ = [
    "REDACTED",
    "is_secret_key",
    "mask_email",
    "mask_phone",
    "mask_text",
    "mask_value",
    "redact_mapping",
]

REDACTED = "***"
"""What a secret value is replaced with."""

_ELLIPSIS = "\u2026"  # …
_MAX_EXTENSION_DIGITS = 5
_KEEP_TAIL = 3
_MAX_KEEP_HEAD = 5
_MIN_HIDDEN = 3

_PHONE_SHAPE = re.compile(r"\+?[0-9]+", re.ASCII)

_EMAIL_LOCAL = r"[A-Za-z0-9._%+\-]"
_TEXT_PATTERN = re.compile(
    # An email address; starts only where a local-part run starts, which keeps
    # the scan linear on long attacker-controlled strings.
    rf"(?P<email>(?<!{_EMAIL_LOCAL}){_EMAIL_LOCAL}+"
    r"@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,})"
    # Asterisk uniqueid / linkedid or a float epoch timestamp: not personal.
    r"|(?P<uniqueid>(?<![0-9])[1-9][0-9]{9}\.[0-9]+)"
    # Channel sequence number: PJSIP/100-00000012, Local/x@ctx-0000000a;1.
    r"|(?P<chanseq>(?<=-)[0-9a-fA-F]{8}(?![0-9A-Za-z]))"
    # Phone number: 6+ digits, optional +, not glued to letters or digits.
    r"|(?P<phone>(?<![0-9A-Za-z])\+?[0-9]{6,}(?![0-9A-Za-z]))",
    re.ASCII,
)

_SECRET_KEY = re.compile(
    r"secret|password|passwd|passphrase|token|authori[sz]ation"
    r"|(?<![a-z])pin(?:code)?(?![a-z])"
)
_CAMEL_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def mask_phone(s: str) -> str:
    """Mask a phone number, keeping a short prefix and the last 3 digits.

    *s* is an optional ``+`` followed by *n* digits.  Up to 5 digits it is an
    internal extension or short code and is returned unchanged.  Otherwise the
    first ``min(5, n - 6)`` digits and the last 3 digits are kept and each
    hidden digit becomes ``*``, so at least 3 digits are always hidden::

        >>> mask_phone("0721000001")
        '0721***001'
        >>> mask_phone("+40721000001")
        '+40721***001'
        >>> mask_phone("0040212345678")
        '00402*****678'
        >>> mask_phone("1001")
        '1001'

    Anything that is not shaped like a number (spaces, letters, free text) is
    passed to :func:`mask_text` instead, so this function never lets through
    what :func:`mask_text` would have masked.
    """
    if not _PHONE_SHAPE.fullmatch(s):
        return mask_text(s)
    plus = "+" if s.startswith("+") else ""
    digits = s[len(plus) :]
    n = len(digits)
    if n <= _MAX_EXTENSION_DIGITS:
        return s
    head = max(0, min(_MAX_KEEP_HEAD, n - _KEEP_TAIL - _MIN_HIDDEN))
    hidden = n - head - _KEEP_TAIL
    return f"{plus}{digits[:head]}{'*' * hidden}{digits[n - _KEEP_TAIL :]}"


def mask_email(s: str) -> str:
    """Shorten the local part of an email address; keep the domain.

    The first 2 characters of the local part are kept (only 1 when the local
    part has 2 characters or fewer), then ``…``::

        >>> mask_email("ion.popescu@example.ro")
        'io…@example.ro'
        >>> mask_email("ab@example.ro")
        'a…@example.ro'

    A string without ``@`` or with an empty local part is returned unchanged.
    """
    local, at, domain = s.rpartition("@")
    if not at or not local:
        return s
    keep = 1 if len(local) <= 2 else 2
    return f"{local[:keep]}{_ELLIPSIS}@{domain}"


def _mask_match(match: re.Match[str]) -> str:
    kind = match.lastgroup
    text = match.group()
    if kind == "email":
        return mask_email(text)
    if kind == "phone":
        return mask_phone(text)
    return text  # uniqueid, channel sequence number


def mask_text(s: str) -> str:
    """Mask every email address and phone number found in free text.

    See the module docstring for what counts as which; uniqueids
    (``1795882891.0``), channel sequence numbers (``-00000012``), extensions
    (``100``) and ISO timestamps are left alone::

        >>> mask_text("Local/0040212345678@lab-outbound-00000000;1")
        'Local/00402*****678@lab-outbound-00000000;1'
    """
    return _TEXT_PATTERN.sub(_mask_match, s)


def mask_value(v: object) -> object:
    """Mask strings in *v*, recursing into mappings, lists and tuples.

    Mapping keys are kept as they are (mappings come back as ``dict``); other
    types (numbers, ``None``, bytes, arbitrary objects) are returned unchanged.
    """
    if isinstance(v, str):
        return mask_text(v)
    if isinstance(v, Mapping):
        return {k: mask_value(item) for k, item in v.items()}
    if isinstance(v, list):
        return [mask_value(item) for item in v]
    if isinstance(v, tuple):
        return tuple(mask_value(item) for item in v)
    return v


def is_secret_key(key: str) -> bool:
    """True when a key's name says its value is a secret (see module docstring)."""
    normalised = _CAMEL_BOUNDARY.sub("_", key).lower()
    return _SECRET_KEY.search(normalised) is not None


def _redact(v: object) -> object:
    if isinstance(v, Mapping):
        return {k: REDACTED if isinstance(k, str) and is_secret_key(k) else _redact(item) for k, item in v.items()}
    if isinstance(v, list):
        return [_redact(item) for item in v]
    if isinstance(v, tuple):
        return tuple(_redact(item) for item in v)
    return v


def redact_mapping(d: Mapping[str, object]) -> dict[str, object]:
    """Return a copy of *d* with every secret-named key's value set to ``'***'``.

    Applies at any depth, including mappings inside lists and tuples.  The
    input is not modified.
    """
    return {k: REDACTED if is_secret_key(k) else _redact(item) for k, item in d.items()}
