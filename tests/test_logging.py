"""ddx.logging's small formatters."""
from ddx import logging as log_lib


def test_hms():
  assert log_lib.hms(0) == "0:00:00"
  assert log_lib.hms(3725.9) == "1:02:05"
  assert log_lib.hms(90061) == "25:01:01"     # hours are not wrapped into days
  assert log_lib.hms(float("nan")) == "?" and log_lib.hms(float("inf")) == "?"
