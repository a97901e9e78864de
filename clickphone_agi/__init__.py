"""clickphone-agi: the daemon beside ClickPhone's Asterisk that keeps the privacy policy's promises."""

__version__ = "0.1.0"
