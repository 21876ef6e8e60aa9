"""What every HTTP exporter shares: the queue, the thread, the client, retries, counters.

An exporter subclasses :class:`HttpExporter` and writes :meth:`HttpExporter._send`
(encode a batch and post it with :meth:`HttpExporter._post`). The base gives it:

* a bounded queue drained in batches by one daemon thread per process
  (:class:`~otelprof_middleware._background.BatchingThread`): ``submit`` never blocks,
  a full queue drops the profile and counts ``<prefix>.dropped.queue_full``;
* one ``httpx.Client`` per thread, made on first send and closed with the thread (a
  forked child makes its own);
* retries, when the exporter asks for them (:class:`RetryPolicy`): connection errors,
  timeouts and the statuses listed in ``retry_statuses`` are retried with exponential
  backoff and jitter, honouring ``Retry-After`` (seconds or an HTTP date), within a time
  budget per batch; closing the exporter ends the wait;
* profiles without a sample are not exported (``<prefix>.skipped.no_samples``): an
  always-on profile of a short request may have got no tick;
* fail-open accounting: a batch that is not delivered counts ``<prefix>.failed`` per
  profile and ``failed.<prefix>.push`` per batch, logged at most once a minute.
"""

from __future__ import annotations

import email.utils
import math
import os
import random
import threading
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import httpx
from pyinstrument.session import Session

from .. import _clock
from .._background import BatchingThread
from .._failsafe import count, log_failure, logger
from .._record import ProfileSummary
from . import SpanFacts

__all__ = ["ExportError", "HttpExporter", "QueuedProfile", "RetryPolicy", "has_samples"]


class ExportError(RuntimeError):
    """The receiver answered with an error status (the message says which)."""


@dataclass(frozen=True, slots=True)
class QueuedProfile:
    """One kept profile waiting for export: its index fields, session and span facts."""

    summary: ProfileSummary
    session: Session
    span: SpanFacts


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When and how long to retry a failed post.

    Attributes:
        max_attempts: posts per batch, the first included (1: never retry).
        initial_backoff: seconds before the first retry; doubled each time, with jitter
            (a random 50-100% of the step).
        max_backoff: the most one wait may last.
        budget: seconds a batch may spend in retries, the waits and posts included;
            a ``Retry-After`` beyond it ends the retries at once.
        retry_statuses: HTTP statuses worth retrying.
    """

    max_attempts: int = 1
    initial_backoff: float = 1.0
    max_backoff: float = 16.0
    budget: float = 30.0
    retry_statuses: Collection[int] = frozenset({429, 502, 503, 504})

    def backoff(self, attempt: int) -> float:
        """The wait after failed attempt number ``attempt`` (1-based), jitter included."""
        step = min(self.max_backoff, self.initial_backoff * 2.0 ** (attempt - 1))
        return float(step * _JITTER.uniform(0.5, 1.0))


NO_RETRIES = RetryPolicy()
_JITTER = random.Random()
"""The retries' jitter: a generator of its own, so the app's seeded ``random`` sequence is
the same however many retries ran."""


def has_samples(session: Session) -> bool:
    """True when the session holds a sample with a stack and some time."""
    return any(stack and seconds > 0 for stack, seconds in session.frame_records)


def retry_after(response: httpx.Response, now: float | None = None) -> float | None:
    """Seconds the server asked to wait (``Retry-After``: seconds or HTTP date), if any."""
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (_clock.time() if now is None else now))


class HttpExporter(BatchingThread):
    """A profile exporter that posts batches over HTTP from its own thread.

    Args:
        thread_name: the delivery thread's name.
        prefix: the counters' prefix (``<prefix>.exported``, ``<prefix>.failed``, ...)
            and the failure stage ``<prefix>.push``.
        queue_size: profiles that may wait; more are dropped and counted, as are
            profiles beyond :data:`~.._background.QUEUED_SAMPLES` samples in all.
        batch_size: most profiles handed to one :meth:`_send`.
        timeout: seconds per HTTP request.
        transport: an httpx transport (tests).
        auth: HTTP basic auth for every request.
        retry: the retry policy (default: never retry).
    """

    def __init__(
        self,
        *,
        thread_name: str,
        prefix: str,
        queue_size: int,
        batch_size: int,
        timeout: float,
        transport: httpx.BaseTransport | None = None,
        auth: tuple[str, str] | None = None,
        retry: RetryPolicy = NO_RETRIES,
    ) -> None:
        self._prefix = prefix
        self._timeout = timeout
        self._transport = transport
        self._auth = auth
        self._retry = retry
        self._closed = False
        self._closing = threading.Event()  # ends a retry's wait at shutdown
        self._client: httpx.Client | None = None  # the thread's, made on first send
        self._sending = 0  # profiles of the batch being sent now
        super().__init__(thread_name, queue_size, batch_size)

    def submit(self, summary: ProfileSummary, session: Session, span: SpanFacts) -> bool:
        """Queue a kept profile; never blocks. False (and counted) when it was dropped."""
        if self._closed:
            count(f"{self._prefix}.dropped.closed")
            return False
        if not has_samples(session):
            # Nothing to show and nothing to link: no export, so no span attribute.
            count(f"{self._prefix}.skipped.no_samples")
            return False
        if not self.offer(QueuedProfile(summary, session, span)):
            count(f"{self._prefix}.dropped.queue_full")
            return False
        return True

    def _samples(self, item: object) -> int:
        return len(item.session.frame_records) if isinstance(item, QueuedProfile) else 0

    def span_attributes(self, summary: ProfileSummary) -> Mapping[str, str]:
        """Attributes for the span of an accepted profile (none unless overridden)."""
        return {}

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (without waiting out retries), then stop the thread.

        Later submits are dropped and counted. Profiles still queued when ``timeout``
        ends (a slow or unreachable receiver) are not sent: they are counted as
        ``<prefix>.dropped.shutdown`` and logged, rather than lost silently at exit.
        """
        self._closed = True
        self._closing.set()
        thread = self._thread
        super().close(timeout)
        if thread is None or not thread.is_alive() or self._queue_pid != os.getpid():
            return
        left = sum(isinstance(item, QueuedProfile) for item in self.take_queued())
        self.ask_to_stop()  # if close() found the queue full
        if left:
            count(f"{self._prefix}.dropped.shutdown", left)
        self._say_unsent(left, timeout, f"dropped, counted as {self._prefix}.dropped.shutdown")

    def note_unsent(self, waited: float) -> int:
        """At shutdown, after a flush that did not end within ``waited`` seconds: count
        (``<prefix>.unsent.shutdown``) and log the profiles not sent yet.

        They stay queued: if the process goes on (an app whose lifespan ended in a test
        client), they are still sent; if it exits now (uvicorn re-raises SIGTERM right
        after the lifespan), they are lost, and the log says so.

        Returns:
            The number of profiles still queued.
        """
        if self._queue_pid != os.getpid():
            return 0
        left = sum(isinstance(item, QueuedProfile) for item in self.queued_items())
        if left:
            count(f"{self._prefix}.unsent.shutdown", left)
        self._say_unsent(
            left,
            waited,
            f"lost if the process exits now, counted as {self._prefix}.unsent.shutdown",
        )
        return left

    def _say_unsent(self, left: int, waited: float, outcome: str) -> None:
        sending = self._sending
        if left or sending:
            logger.warning(
                "otelprof: %s export: at shutdown, %d profiles were still queued and %d "
                "being sent after %g s (the receiver did not take them in time): %s. "
                "otelprof's store has them.",
                self._prefix,
                left,
                sending,
                waited,
                outcome,
            )

    def _send(self, client: httpx.Client, items: Sequence[QueuedProfile]) -> None:
        """Encode and post one batch; count what was delivered and what failed.

        Raising is allowed: the base counts every profile of the batch as failed.
        """
        raise NotImplementedError

    def _process(self, items: list[object]) -> None:
        """Push one batch; a failure is counted, never raised."""
        profiles = [item for item in items if isinstance(item, QueuedProfile)]
        self._sending = len(profiles)
        try:
            if self._client is None:
                # httpx's default trust_env: HTTPS_PROXY, NO_PROXY and SSL_CERT_FILE
                # apply, as egress to a hosted backend often needs.
                self._client = httpx.Client(
                    timeout=self._timeout, transport=self._transport, auth=self._auth
                )
            self._send(self._client, profiles)
        except Exception as exc:  # the thread must outlive any failure
            self._failed(len(profiles), exc)
        finally:
            self._sending = 0

    def _failed(self, profiles: int, exc: BaseException) -> None:
        count(f"{self._prefix}.failed", profiles)
        log_failure(f"{self._prefix}.push", exc)

    def _post(
        self,
        client: httpx.Client,
        url: str,
        *,
        content: bytes,
        headers: Mapping[str, str],
        params: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """POST ``content``; retry as the policy says; return the 2xx response.

        Raises:
            ExportError: a status that is not retried, or the last retried one.
            httpx.HTTPError: the connection failed (after the retries).
        """
        policy = self._retry
        deadline = _clock.monotonic() + policy.budget
        attempt = 0
        while True:
            attempt += 1
            wait: float | None = None
            try:
                response = client.post(url, params=params, content=content, headers=headers)
            except httpx.TransportError as exc:  # refused, reset, timed out: retryable
                error: Exception = exc
            else:
                if response.status_code < 300:
                    return response
                error = ExportError(f"HTTP {response.status_code}: {response.text[:200].strip()}")
                if response.status_code not in policy.retry_statuses:
                    raise error
                wait = retry_after(response)
            if attempt >= policy.max_attempts:
                raise error
            if wait is None:
                wait = policy.backoff(attempt)
            if not math.isfinite(wait) or _clock.monotonic() + wait > deadline:
                raise error  # the server asks for longer than the budget allows
            count(f"{self._prefix}.retried")
            if self._closing.wait(wait):
                raise error  # shutting down: no more waiting

    def _start(self) -> None:
        self._client = None  # a forked child's thread must not share the parent's pool
        super()._start()

    def _thread_exit(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()
