"""Request handlers: what answers an `Exchange`, whichever listener and protocol it came on.

The forwarding core (HTTPS), the redirector (plain HTTP) and the admin endpoints; each runs
inside `Observed`, so every request on every listener ends as one `Outcome`.
"""
