"""Outbound notifications: what the engine tells the world besides Kafka.

Projections (`services/projections/`) turn the event log into jobs in one
outbox (`outbox`); one dispatcher sends each job through the sender of its
kind: signed webhooks to the vendor's endpoints (`webhooks`), mail to the
buyer (`mail`), activation codes back into Stripe (`stripe_codes`).
"""
