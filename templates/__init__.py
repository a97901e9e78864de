"""Notification templates (Jinja2), shipped inside the package as clickphone_agi.templates."""
