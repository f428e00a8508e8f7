"""HTTP front ends (h11, h2), the shared request model and header policy."""
