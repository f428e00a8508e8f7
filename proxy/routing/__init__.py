"""Per-request decisions inside a site: which route, and who the client is."""
