"""Allow ``python -m clickphone_agi``."""

from clickphone_agi.cli import entry

entry()
