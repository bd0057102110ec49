"""Bounded waits for tests: every wait in a test ends, true or not."""
import time

# How long a test waits for the runtime to settle (a worker exit, a freed
# segment): generous, since the machines that run the suite are shared.
GRACE_S = 10.0


def wait_for(pred, timeout=GRACE_S, step=0.05):
    """Poll pred() until it is true or timeout passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(step)
