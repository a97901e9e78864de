"""Allow ``python -m clickphone_agi``."""

from clickphone_agi.cli import entry

if __name__ == "__main__":  # not when the fax converter's process (spawn) imports this module again
    entry()
