"""Asynchronous generation: jobs, their event streams and webhooks (``Prefer: respond-async``).

``store`` (tables and statements), ``events`` (durable streams, SSE), ``runner`` (submit, background
delivery, cancel, recovery; ``build_job_runner`` wires them), ``webhooks`` (Standard Webhooks
deliveries), ``http`` (the HTTP side). Nothing is imported here, so that ``webhooks`` alone stays light.
"""
