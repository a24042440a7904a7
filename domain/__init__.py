"""The entitlement domain: catalog, aggregates and lifecycle rules.

Pure code: no I/O, no clocks, no Kafka, no HTTP. Time and randomness are
passed in by the service layer.
"""
