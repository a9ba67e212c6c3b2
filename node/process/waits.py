"""The one bounded wait: block on a condition until a predicate holds, time runs out, or the waiter gives up.

Waits re-check `cancelled` every `recheck_s` seconds because what cancels them (a closed gRPC call, a stop
event) does not notify the condition.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


def wait_until(cv: threading.Condition, done: Callable[[], bool], timeout: float, recheck_s: float,
               cancelled: Callable[[], bool] = lambda: False) -> bool:
    """True once `done()` holds (checked under `cv`); False after `timeout` seconds or once `cancelled()`."""
    deadline = time.monotonic() + timeout
    with cv:
        while not done():
            left = deadline - time.monotonic()
            if left <= 0 or cancelled():
                return False
            cv.wait(min(left, recheck_s))
        return True
