"""The framework-agnostic core the ASGI and WSGI adapters delegate to.

``start()`` decides and starts a request's profile; ``finish()`` stops it, decides
whether to keep it, puts the link on the span and hands the session to the writer.
Both are fail-open: any internal error leaves the request unprofiled, never harmed.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import logging
import re
import sys
import threading
import time
import types
from collections.abc import Awaitable, Mapping, Sequence
from contextvars import Token
from dataclasses import dataclass, field

from opentelemetry import trace
from opentelemetry.trace import SpanContext, format_span_id, format_trace_id
from pyinstrument.session import Session
from pyinstrument.stack_sampler import build_call_stack

from .._config import Config
from .._failsafe import count, fail_open, log_failure, tally
from .._net import safe_host
from .._record import ProfileRecord, ProfileSummary
from .._request import RequestFacts
from ..exporters import ProfileExporter, SpanFacts, check_exporter_settings, open_exporter
from ..stores import check_store_url, open_store
from ..stores._base import ProfileStore
from ._keep_policy import MIN_DURATION, KeepPolicy
from ._loop_hook import HookedCoroutine, install_task_factory
from ._request_profile import RequestProfile, current_request
from ._span import profile_url, route_attribute, set_profile_attributes
from ._start_policy import StartPolicy
from ._thread_hook import ThreadHook, thread_hook
from ._writer import ProfileWriter
from .always_on import AlwaysOnSampler, always_on_sampler
from .always_on import check_settings as check_always_on_settings

__all__ = [
    "ActiveProfile",
    "LazyStore",
    "ProfilerCore",
    "load_config",
    "normalise_method",
    "safe_host",
]

_KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)
STORE_RETRY_SECONDS = 5.0
ALWAYS_ON_MAX_CONCURRENT = 1024
"""Most always-on profiles in flight on one event loop (or on the process's threads)."""
_count_discarded = tally("discarded.not_kept")
_logger = logging.getLogger("otelprof_middleware")


_start_stacks: dict[tuple[int, ...], list[str]] = {}
_START_STACK_KEY_DEPTH = 2
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_MAX_SERVICE_LENGTH = 200


def _start_stack(frame: types.FrameType) -> list[str]:
    """pyinstrument's ``build_call_stack`` of ``frame``, cached by call site.

    Every request of a server starts at the same few call chains; the code objects of
    the innermost frames are much cheaper to read than building each frame's
    identifier, and the two innermost tell the chains apart. (The start stack only
    steers pyinstrument's stem trimming: a rare stale entry costs a less trimmed tree.)
    """
    key = [threading.get_ident()]
    current: types.FrameType | None = frame
    while current is not None and len(key) <= _START_STACK_KEY_DEPTH:
        key.append(id(current.f_code))  # hashing a code object hashes its bytecode
        current = current.f_back
    cache_key = tuple(key)
    stack = _start_stacks.get(cache_key)
    if stack is None:
        if len(_start_stacks) >= 512:
            _start_stacks.clear()
        stack = _start_stacks[cache_key] = build_call_stack(frame, "initial", None)
    return stack


def _lazy_url(config: Config, facts: RequestFacts, context: SpanContext) -> str:
    return profile_url(
        base_url_of(config, facts),
        format_trace_id(context.trace_id),
        format_span_id(context.span_id),
    )


def base_url_of(config: Config, facts: RequestFacts) -> str:
    """The start of the request's profile links: ``public_url``, or its own scheme, host
    (the Host header if usable, else the server's address) and mount point."""
    host = safe_host(facts.host_header()) or safe_host(facts.server_address())
    return config.base_url(facts.scheme, host, facts.root_path)


def load_config(settings: Mapping[str, object], *, has_store: bool) -> Config:
    """The middleware's settings; an invalid one turns profiling off, loudly.

    Every setting and the store URL are checked now, when the middleware is built (the
    store is not opened: a server's master process may fork after this). An invalid
    one is logged as an error naming the setting and its variable, counted
    (``disabled.invalid_setting``), and the middleware passes every request straight
    through: an observability setting never stops, or breaks, the app.
    """
    try:
        config = Config.load(**settings)
        if config.enabled and not has_store:
            check_store_url(config.resolved_store_url())
        if config.enabled:
            check_exporter_settings(config.otlp_profiles)
    except (ValueError, ImportError) as exc:
        count("disabled.invalid_setting")
        _logger.error(
            "otelprof: profiling is OFF for this app: %s. The app runs unchanged; "
            "fix the setting and restart to profile.",
            exc,
        )
        return Config.load({}, enabled=False)
    return config


def normalise_method(method: str) -> str:
    """The request method, or ``_OTHER`` as OTel's semantic conventions spell unknown ones."""
    return method if method in _KNOWN_METHODS else "_OTHER"


@dataclass(slots=True)
class ActiveProfile:
    """A request being profiled."""

    request: RequestProfile
    hook: ThreadHook | None  # the thread's hook; None: always-on, or on a loop
    span: trace.Span
    context: SpanContext
    facts: RequestFacts
    method: str
    token: Token[RequestProfile | None] | None
    finished: bool = field(default=False)
    duration: float = field(default=0.0)  # seconds, set when stopped
    triggered: bool = field(default=False)  # asked for by the trigger header

    @property
    def trace_id(self) -> str:
        """The trace id in hex (formatted when asked: most profiles are never kept)."""
        return format_trace_id(self.context.trace_id)

    @property
    def span_id(self) -> str:
        """The span id in hex."""
        return format_span_id(self.context.span_id)


class ProfilerCore:
    """Sampling, the per-request session, the store and the writer, behind two calls.

    Args:
        config: the settings.
        store: a store instance to use instead of opening ``config.store``.
        exporter: an exporter to use instead of the one the settings ask for
            (``pyroscope_url``); None and no such setting: no export.
    """

    def __init__(
        self,
        config: Config,
        *,
        store: ProfileStore | None = None,
        exporter: ProfileExporter | None = None,
    ) -> None:
        self.config = config
        self.start_policy = StartPolicy(config)
        self._store = store
        self._store_lock = threading.Lock()
        self._store_retry_at = 0.0
        self.writer = ProfileWriter(self.get_store, config.writer_queue_size)
        self._active = 0
        self._active_lock = threading.Lock()
        self._interval = config.interval
        self._always_on_interval = config.always_on_interval_ms / 1000.0
        self.keep_policy = KeepPolicy(
            min_duration_ms=config.min_duration_ms,
            slow_floor_ms=config.slow_floor_ms,
            keep_per_second=config.keep_per_second,
        )
        self._sampler_instance: AlwaysOnSampler | None = None
        if config.enabled and config.mode == "always_on":  # loud now, not at a request
            check_always_on_settings(self._always_on_interval, sigprof=config.always_on_sigprof)
        atexit.register(self.writer.close, 2.0)
        self.exporter = exporter or open_exporter(
            config.pyroscope_url,
            tenant_id=config.pyroscope_tenant_id,
            service_name=config.service_name,
            otlp_profiles=config.otlp_profiles,
            otlp_profiles_pyroscope=config.otlp_profiles_pyroscope,
        )
        if self.exporter is not None:
            atexit.register(self.exporter.close, 2.0)

    def get_store(self) -> ProfileStore:
        """The store, opened on first use; after a failure, retried every few seconds.

        Raises:
            Exception: whatever opening the store raised (callers fail open).
        """
        store = self._store
        if store is not None:
            return store
        with self._store_lock:
            if self._store is not None:
                return self._store
            now = time.monotonic()
            if now < self._store_retry_at:
                raise RuntimeError("profile store unavailable (retrying shortly)")
            try:
                self._store = open_store(
                    self.config.resolved_store_url(),
                    max_profiles=self.config.store_max_profiles,
                    max_bytes=self.config.store_max_bytes,
                )
            except Exception:
                self._store_retry_at = now + STORE_RETRY_SECONDS
                raise
            return self._store

    def start(self, span: trace.Span, facts: RequestFacts) -> ActiveProfile | None:
        """Decide whether to profile this request and, if so, start its profile.

        ``span``: the request's server span; ``facts``: the request, as its adapter
        describes it. Must run on the thread (and in the asyncio task) that runs the
        request. The profile's link is known from here on (made when first read).
        """
        context = span.get_span_context()
        if not context.is_valid:  # no SDK provider: nothing to key or link the profile by
            return None
        trigger = facts.trigger
        kind = self.start_policy.choose(
            context.trace_id, span.is_recording(), trigger, facts.client_host
        )
        if kind is None:
            return None
        outer = current_request.get()
        if outer is not None and not outer.closed:
            return None  # already profiled by an outer middleware: never twice
        if kind == "always_on":
            return self._start_always_on(span, context, facts)
        with self._active_lock:
            if self._active >= self.config.max_concurrent:
                count("skipped.concurrency_cap")
                return None
            self._active += 1
        try:
            loop = asyncio._get_running_loop()
            request = RequestProfile(
                interval=self._interval,
                max_samples=self.config.max_samples,
                # On a loop the stem is found in the samples, as always-on's is.
                start_call_stack=None if loop is not None else _start_stack(sys._getframe(2)),
            )
            token = current_request.set(request)
            hook: ThreadHook | None = None
            try:
                if loop is not None:  # the hook runs only in the request's own task steps
                    install_task_factory(loop)
                else:  # a thread serves one request at a time: the hook stays on
                    hook = thread_hook(self._interval)
                    hook.acquire()
            except BaseException:
                current_request.reset(token)
                raise
        except Exception as exc:
            self._release_slot()
            log_failure("profiler.start", exc)
            return None
        return self._linked(
            ActiveProfile(
                request=request,
                hook=hook,
                span=span,
                context=context,
                facts=facts,
                method=normalise_method(facts.method),
                token=token,
                triggered=trigger is not None
                and self.start_policy.is_triggered(trigger, facts.client_host),
            )
        )

    def _start_always_on(
        self, span: trace.Span, context: SpanContext, facts: RequestFacts
    ) -> ActiveProfile | None:
        """:meth:`start` for the always-on sampler: the cheapest path there is.

        Most of these profiles are discarded as too short, so nothing is worked out
        that only a kept one needs (the start stack comes from its samples).
        """
        try:
            sampler = self._sampler_instance or self._always_on_sampler()
            request = RequestProfile(
                interval=sampler.interval,  # the process's (see always_on_sampler)
                max_samples=self.config.max_samples,
                start_call_stack=None,
                continuous=True,
            )
            token = current_request.set(request)
            try:
                registered = sampler.register_current(request, ALWAYS_ON_MAX_CONCURRENT)
            except BaseException:
                current_request.reset(token)
                raise
        except Exception as exc:
            log_failure("profiler.start", exc)
            return None
        if not registered:
            current_request.reset(token)
            count("skipped.concurrency_cap")
            return None
        return self._linked(
            ActiveProfile(
                request=request,
                hook=None,
                span=span,
                context=context,
                facts=facts,
                method=normalise_method(facts.method),
                token=token,
            )
        )

    @staticmethod
    def confine(active: ActiveProfile, app_call: Awaitable[None]) -> Awaitable[None]:
        """What the adapter awaits instead of ``app_call``: the app's coroutine, run by
        the request's task, with the hook on during its steps only (hook mode on a loop).
        """
        request = active.request
        if request.continuous or active.hook is not None:
            return app_call
        if type(app_call) is not types.CoroutineType:  # an app returning a future, say
            return app_call
        return HookedCoroutine(app_call, request, main=True)

    def _linked(self, active: ActiveProfile) -> ActiveProfile:
        """Note the URL the profile will have if kept, for the request's log records
        (otelprof_middleware.logging). Made only if a log record asks: everything, the hex
        ids included. (The context, not ``active``: no reference cycle for the GC.)
        """
        active.request.url_factory = functools.partial(
            _lazy_url, self.config, active.facts, active.context
        )
        return active

    def finish(
        self,
        active: ActiveProfile,
        *,
        status_code: int,
        route: str | None,
        failed: bool = False,
    ) -> None:
        """The request ended: stop the profile; keep it if the keep policy says so (span
        link, then the writer).

        ``route``: the matched route template when the adapter knows it (else the span's
        ``http.route``, else none). ``failed``: the app raised. Safe to call more than
        once (only the first call counts) and from any task.
        """
        if not self.stop(active):
            return
        if active.request.hook_failed:  # counted and logged where it failed
            active.request.url = None
            return
        policy = self.keep_policy
        route_name = route or route_attribute(active.span) or ""
        reason = policy.reason(
            route=route_name,
            duration=active.duration,
            status_code=status_code,
            failed=failed,
            triggered=active.triggered,
        )
        if reason is None:
            active.request.url = None  # later log records must not point at a discarded profile
            _count_discarded()
            return
        self.keep(active, status_code=status_code, route=route_name, reason=reason)

    def stop(self, active: ActiveProfile, *, from_finalizer: bool = False) -> bool:
        """Stop the profile; True when this call stopped it (only the first call does).
        ``from_finalizer``: called by the garbage collector (see :class:`ThreadHook`).
        """
        if active.finished:
            return False
        active.finished = True
        request = active.request
        request.closed = True
        duration = time.perf_counter() - request.start_perf
        try:  # (not ``fail_open``: a generator context manager costs ~2 µs a request)
            hook = active.hook
            if request.continuous:
                (self._sampler_instance or self._always_on_sampler()).unregister_current(request)
            elif hook is None:
                pass  # hook mode on a loop: each step of the request removed its hook
            elif hook.thread_id == threading.get_ident():
                users = hook.users
                try:
                    hook.release(from_finalizer=from_finalizer)
                except Exception:
                    # Failed before giving its user back: do it. The unused hook goes at
                    # the next acquire or release on this thread.
                    if hook.users == users:
                        hook.users = max(0, users - 1)
                    raise
            else:  # finished elsewhere: the unused hook goes with that thread's next request
                hook.users -= 1
        except Exception as exc:
            log_failure("profiler.stop", exc)
        if not request.continuous:
            self._release_slot()
        active.duration = duration
        return True

    def discard(self, active: ActiveProfile) -> None:
        """Stop the profile and keep nothing: its response was abandoned, never closed.

        Runs wherever the garbage collector collected the response, so it neither
        touches the span nor resets the contextvar (that context may be running another
        request now); never raises.
        """
        try:
            if self.stop(active, from_finalizer=True):
                active.request.url = None
                count("discarded.abandoned")
        except Exception as exc:
            log_failure("profiler.stop", exc)

    def keep(
        self,
        active: ActiveProfile,
        *,
        status_code: int,
        route: str,
        reason: str = MIN_DURATION,
    ) -> None:
        """Keep a stopped profile: span link, then the writer (and exporter)."""
        request = active.request
        duration = active.duration
        base_url = base_url_of(self.config, active.facts)
        with fail_open("span"):
            if active.span.is_recording():
                set_profile_attributes(
                    active.span, active.trace_id, active.span_id, base_url, has_route=bool(route)
                )
        session: Session | None = None
        with fail_open("writer.submit"):
            summary = ProfileSummary(
                trace_id=active.trace_id,
                span_id=active.span_id,
                method=active.method,
                route=route,
                status_code=status_code,
                duration_ms=round(duration * 1000.0, 3),
                start_time=request.start_wall,
                sample_count=len(request.records),
                mode="always_on" if request.continuous else "hook",
                interval_ms=round(request.interval * 1000.0, 3),
                kept_reason=reason,
                service=self._service_name(active.span),
            )
            how = "always-on sampler" if request.continuous else "pyinstrument hook"
            request.description = (
                f"{active.method} {route or '(unmatched route)'}"
                f" · {how}, interval {summary.interval_ms:g} ms"
            )
            session = request.to_session(duration)
            if not self.writer.submit(summary, session):
                request.url = None  # dropped (queue full): no link for later log records
        exporter = self.exporter
        if exporter is not None and session is not None:
            with fail_open("exporter.submit"):
                # The exporter's attributes (pyroscope.profile.id) only if it took the
                # profile, and while the span is still open.
                accepted = exporter.submit(summary, session, SpanFacts.of(active.span))
                if accepted and active.span.is_recording():
                    active.span.set_attributes(exporter.span_attributes(summary))

    def drain(self, timeout: float = 2.0) -> None:
        """Write what the writer holds and send what the exporter holds, each within
        ``timeout`` seconds: the server is shutting down (see the ASGI lifespan)."""
        self.writer.flush(timeout)
        if self.exporter is not None:
            self.exporter.flush(timeout)

    def _service_name(self, span: trace.Span) -> str:
        """The service a profile belongs to: the span's ``service.name`` (what trace UIs
        show), else the configured one (``OTELPROF_SERVICE_NAME``), else ``unknown_service``."""
        name = SpanFacts.of(span).service_name
        if not name or name.startswith("unknown_service"):
            name = self.config.resolved_service_name
        return _CONTROL.sub(" ", name)[:_MAX_SERVICE_LENGTH]

    def _always_on_sampler(self) -> AlwaysOnSampler:
        sampler = self._sampler_instance
        if sampler is None:
            sampler = self._sampler_instance = always_on_sampler(
                self._always_on_interval, sigprof=self.config.always_on_sigprof
            )
        return sampler

    def _release_slot(self) -> None:
        with self._active_lock:
            self._active -= 1

    @staticmethod
    def detach(active: ActiveProfile) -> None:
        """Clear the request's contextvar in the context that set it."""
        token, active.token = active.token, None
        if token is None:
            return
        try:  # noqa: SIM105  (contextlib.suppress costs a context manager per request)
            current_request.reset(token)
        except ValueError:
            # A different context (close() on another task or thread, or run by the
            # garbage collector inside unrelated code): setting anything here would
            # change that context's request. The stale one is closed, and every reader
            # of the contextvar ignores a closed request.
            pass


class LazyStore:
    """A :class:`ProfileStore` that opens the core's store on first use (for the viewer)."""

    def __init__(self, core: ProfilerCore) -> None:
        self._core = core

    @property
    def url(self) -> str:
        """The store's URL."""
        return self._core.config.resolved_store_url()

    def put(self, record: ProfileRecord) -> None:
        """See :meth:`ProfileStore.put`."""
        self._core.get_store().put(record)

    def put_many(self, records: Sequence[ProfileRecord]) -> None:
        """See :meth:`ProfileStore.put_many`."""
        self._core.get_store().put_many(records)

    def get(self, trace_id: str, span_id: str | None = None) -> Sequence[ProfileRecord]:
        """See :meth:`ProfileStore.get`."""
        return self._core.get_store().get(trace_id, span_id)

    def list(
        self,
        *,
        limit: int = 100,
        route: str | None = None,
        min_duration_ms: float | None = None,
        since: float | None = None,
        until: float | None = None,
        order: str = "newest",
    ) -> Sequence[ProfileSummary]:
        """See :meth:`ProfileStore.list`."""
        return self._core.get_store().list(
            limit=limit,
            route=route,
            min_duration_ms=min_duration_ms,
            since=since,
            until=until,
            order=order,
        )

    def delete(self, trace_id: str, span_id: str | None = None) -> int:
        """See :meth:`ProfileStore.delete`."""
        return self._core.get_store().delete(trace_id, span_id)

    def stats(self) -> tuple[int, int]:
        """See :meth:`ProfileStore.stats`."""
        return self._core.get_store().stats()

    def close(self) -> None:
        """Closing is the core's business; nothing to do."""
