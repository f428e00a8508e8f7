"""TLS termination: ClientHello inspection, context policy, the TLS byte stream."""
