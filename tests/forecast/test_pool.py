"""`reproduce --jobs`: a failing worker stops the others at once and its error reaches the caller."""

from __future__ import annotations

import operator
import os
import time

import pytest

from outlier_probe.errors import ProbeError
from outlier_probe.forecast.pool import run_calls


@pytest.mark.parametrize(("call", "error"), [((operator.truediv, (1, 0)), ZeroDivisionError),
                                             ((os._exit, (3,)), ProbeError)])
def test_a_failing_worker_stops_the_others(call: tuple, error: type) -> None:
    start = time.perf_counter()
    with pytest.raises(error, match="division by zero|worker process died .*; unfinished: (first, )?second"):
        run_calls([(time.sleep, (120,)), call], jobs=2, labels=["first", "second"])
    assert time.perf_counter() - start < 60  # the sleeping worker was terminated, not waited for


def test_one_job_runs_in_this_process() -> None:
    assert run_calls([(operator.add, (1, 2)), (os.getpid, ())], jobs=1, labels=["a", "b"]) == [3, os.getpid()]
