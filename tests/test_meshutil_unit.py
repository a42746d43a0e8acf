"""meshutil.wait_until: the one polling helper of the end-to-end tests."""

from __future__ import annotations

import pytest
from meshutil import wait_until


class Counter:
    """A predicate that becomes truthy on its `ready_at`-th call (returning the call number)."""

    def __init__(self, ready_at: int | None, fail_with: BaseException | None = None):
        self.calls = 0
        self.ready_at = ready_at
        self.fail_with = fail_with

    def __call__(self) -> int:
        self.calls += 1
        if self.fail_with is not None and (self.ready_at is None or self.calls < self.ready_at):
            raise self.fail_with
        return self.calls if self.ready_at is not None and self.calls >= self.ready_at else 0


def test_returns_the_first_truthy_value_and_stops_polling():
    pred = Counter(ready_at=3)
    assert wait_until(pred, timeout=30, what="the third call", interval=0.001) == 3
    assert pred.calls == 3


def test_a_timeout_fails_naming_what_it_waited_for():
    pred = Counter(ready_at=None)
    with pytest.raises(AssertionError, match=r"timed out after 0.05 s waiting for the KV to be freed: 0 seen"):
        wait_until(pred, timeout=0.05, what=lambda: f"the KV to be freed: {pred()} seen", interval=0.001)
    assert pred.calls >= 2  # it polled, and the message was built after the last poll


def test_an_exception_not_ignored_ends_the_wait_at_once():
    pred = Counter(ready_at=None, fail_with=RuntimeError("the child exited"))
    with pytest.raises(RuntimeError, match="the child exited"):
        wait_until(pred, timeout=30, what="never", interval=0.001)
    assert pred.calls == 1


def test_ignored_exceptions_mean_not_yet():
    pred = Counter(ready_at=4, fail_with=ConnectionRefusedError("port closed"))
    assert wait_until(pred, timeout=30, what="the port", interval=0.001, ignore=(OSError,)) == 4
    stuck = Counter(ready_at=None, fail_with=ConnectionRefusedError("port closed"))
    with pytest.raises(AssertionError, match=r"waiting for the port; last error: ConnectionRefusedError\('port closed'\)"):
        wait_until(stuck, timeout=0.05, what="the port", interval=0.001, ignore=(OSError,))
