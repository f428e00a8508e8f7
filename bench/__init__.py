"""The benchmark harness (`python bench/run.py`): port443 against nginx, HAProxy and Caddy."""
