"""Processes and adapters that wire the entitlement domain to infrastructure."""
