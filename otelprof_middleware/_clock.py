"""The clocks and the sleep the package uses, bound when it is imported.

A user's test may patch ``time.sleep`` (to skip the app's waits) or ``time.perf_counter``
or ``time.time`` (to fix what the app measures) around a request, and assert on the mock:
``mock.patch("time.sleep")`` replaces the ``time`` module's attribute for every thread.
The package's code reads these names instead, so its calls (the sampler thread's sleep
between ticks, the request path's clock readings) neither land in the user's mock nor
take the values meant for the app. freezegun, which replaces every module attribute that
is a real clock, still freezes these as it freezes ``time.perf_counter``
(docs/quickstart.md, frozen time).
"""

from __future__ import annotations

from time import monotonic, perf_counter, sleep, time

__all__ = ["monotonic", "perf_counter", "sleep", "time"]
