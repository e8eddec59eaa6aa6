"""Fake worker programs for the transport-hardening tests (run as scripts, never imported)."""
