"""`python -m tests.support.quick_backoff run -c FILE`: the real proxy, but its retry backoff starts
at 1 second instead of 1 minute, so that a test can watch failures, backoff and recovery.
Nothing else differs from `python -m proxy`."""

from datetime import timedelta

from proxy.certs import renewal
from proxy.cli import main

renewal.BACKOFF_MIN = timedelta(seconds=1)
raise SystemExit(main())
