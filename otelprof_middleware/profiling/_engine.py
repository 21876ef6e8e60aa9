"""The framework-agnostic core the ASGI and WSGI adapters delegate to.

``start()`` decides and starts a request's profile; ``finish()`` stops it, decides
whether to keep it, puts the link on the span and hands the session to the writer.
Both are fail-open: any internal error leaves the request unprofiled, never harmed.

:class:`ProfilerCore` holds the pieces and runs the request through them: the start
policy (:mod:`._start_policy`), the two ways to start (:mod:`._hook_start`,
:mod:`._always_on_start`), the keep policy (:mod:`._keep_policy`), keeping
(:mod:`._keeper`), and the store opened on first use (:mod:`._store_opener`).
"""

from __future__ import annotations

import types
from collections.abc import Awaitable

from opentelemetry import trace
from opentelemetry.trace import SpanContext

from .. import _clock
from .._config import Config
from .._failsafe import count, log_failure, log_once
from .._fork import may_profile_here
from .._request import RequestFacts
from ..exporters import ProfileExporter, open_exporter
from ..stores._base import ProfileStore
from ._active_profile import ActiveProfile
from ._always_on_start import AlwaysOnStart
from ._at_exit import close_at_exit
from ._hook_start import HookStart
from ._keep_policy import KeepPolicy
from ._keeper import Keeper
from ._loop_hook import HookedCoroutine, note_hooked_producer
from ._request_profile import current_request
from ._span import route_attribute
from ._start_policy import StartPolicy
from ._store_opener import StoreOpener
from ._writer import ProfileWriter

__all__ = ["ProfilerCore"]


class ProfilerCore:
    """Sampling, the per-request session, the store and the writer, behind two calls.

    Args:
        config: the settings.
        store: a store instance to use instead of opening ``config.store``.
        exporter: an exporter to use instead of the one the settings ask for
            (``pyroscope_url``); None and no such setting: no export.
        tracer_provider: the middleware's own provider, if it was given one (its
            resource names the service of a profile whose span was not recorded).
    """

    def __init__(
        self,
        config: Config,
        *,
        store: ProfileStore | None = None,
        exporter: ProfileExporter | None = None,
        tracer_provider: trace.TracerProvider | None = None,
    ) -> None:
        self.config = config
        self.start_policy = StartPolicy(config)
        self.store_opener = StoreOpener(config, store)
        writer = ProfileWriter(self.store_opener.get, config.writer_queue_size)
        self.keep_policy = KeepPolicy(
            min_duration_ms=config.min_duration_ms,
            slow_floor_ms=config.slow_floor_ms,
            keep_per_second=config.keep_per_second,
        )
        self.hook_start = HookStart(config, self.start_policy)
        self.always_on_start = AlwaysOnStart(config)  # its settings: loud now, not at a request
        close_at_exit(writer)
        exporter = exporter or open_exporter(
            config.pyroscope_url,
            tenant_id=config.pyroscope_tenant_id,
            service_name=config.service_name,
            otlp_profiles=config.otlp_profiles,
            otlp_profiles_pyroscope=config.otlp_profiles_pyroscope,
        )
        if exporter is not None:
            close_at_exit(exporter)
        self.keeper = Keeper(config, writer, exporter, tracer_provider=tracer_provider)

    @property
    def writer(self) -> ProfileWriter:
        """The background writer of kept profiles (the keeper's)."""
        return self.keeper.writer

    @property
    def exporter(self) -> ProfileExporter | None:
        """Where kept profiles are exported too (the keeper's); None: nowhere."""
        return self.keeper.exporter

    def get_store(self) -> ProfileStore:
        """The store, opened on first use; after a failure, retried every few seconds
        (see :class:`~._store_opener.StoreOpener`).

        Raises:
            Exception: whatever opening the store raised (callers fail open).
        """
        return self.store_opener.get()

    def start(
        self, span: trace.Span, context: SpanContext, facts: RequestFacts
    ) -> ActiveProfile | None:
        """Decide whether to profile this request and, if so, start its profile.

        ``span``: the request's server span; ``context``: its span context (the adapter
        has read it to choose the span); ``facts``: the request, as its adapter
        describes it. Must run on the thread (and in the asyncio task) that runs the
        request. The profile's link is known from here on (made when first read).
        """
        if not may_profile_here():  # (uWSGI's master, or a warm-up before it forks)
            count("skipped.uwsgi_before_fork")
            log_once(
                "uwsgi_before_fork",
                "otelprof: requests served by uWSGI's master process, or before uWSGI "
                "forks its workers (a warm-up at import), are not profiled: a thread "
                "started there can hang the workers uWSGI forks. The workers profile "
                "theirs. Counted as skipped.uwsgi_before_fork; said once per process.",
            )
            return None
        if not context.is_valid:  # no SDK provider: nothing to key or link the profile by
            count("skipped.no_span")
            log_once(  # once per process: a test suite builds an app (and a core) per test
                "no_span",
                "otelprof: requests here have no valid OpenTelemetry span (no SDK "
                "TracerProvider is set, or OTEL_SDK_DISABLED is true), so none is "
                "profiled: set up the SDK's TracerProvider to get profiles. "
                "Counted as skipped.no_span; said once per process.",
            )
            return None
        kind = self.start_policy.choose(
            context.trace_id, span.is_recording(), facts.trigger, facts.client_host
        )
        if kind is None:
            return None
        outer = current_request.get()
        if outer is not None and not outer.closed and outer.left_app_at is None:
            # Already profiled by an outer middleware: never twice. (Not a WSGI request
            # whose app returned: its body, never closed, can stay open in this context
            # for good, as a warm-up's response does through a --preload fork.)
            return None
        if kind == "always_on":
            return self.always_on_start.start(span, context, facts)
        return self.hook_start.start(span, context, facts)

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

    def response_sent_here(self, active: ActiveProfile) -> None:
        """The response starts from the current task: if that is not the request's own
        task, the request waits where that task waits from now on.

        Starlette's ``StreamingResponse`` (on servers reporting ASGI spec below 2.4:
        uvicorn, hypercorn, the test clients) sends the response from a child task while
        the request's own task waits for the client to leave: what the body awaits (an
        upstream call) would otherwise show as the request waiting for its client.
        Never raises.
        """
        request = active.request
        try:
            if request.continuous:
                self.always_on_start.note_producer(request)
            else:
                note_hooked_producer(request)
        except Exception as exc:
            log_failure("profiler.producer", exc)

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

        ``route``: the matched route template when the adapter knows it, ``""`` when it
        knows there is none (else, for None, the span's ``http.route``, else none).
        ``failed``: the app raised. Safe to call more than once (only the first call
        counts) and from any task.
        """
        if not self.stop(active):
            return
        if active.request.hook_failed:  # counted and logged where it failed
            active.request.url = None
            return
        route_name = route if route is not None else (route_attribute(active.span) or "")
        reason = self.keep_policy.reason(
            route=route_name,
            duration=active.duration,
            status_code=status_code,
            failed=failed,
            triggered=active.triggered,
        )
        if reason is None:
            active.request.url = None  # later log records must not point at a discarded profile
            return  # (counted by the policy: not kept, or over budget)
        self.keeper.keep(active, status_code=status_code, route=route_name, reason=reason)

    def stop(self, active: ActiveProfile, *, from_finalizer: bool = False) -> bool:
        """Stop the profile; True when this call stopped it (only the first call does).
        ``from_finalizer``: called by the garbage collector (see
        :class:`~._thread_hook.ThreadHook`).
        """
        if active.finished:
            return False
        active.finished = True
        request = active.request
        request.closed = True
        duration = _clock.perf_counter() - request.start_perf
        if request.continuous:
            # Inline, not a call to the always-on start: every always-on request ends here.
            # (Not ``fail_open`` either: a generator context manager costs ~2 µs a request.)
            try:
                sampler = self.always_on_start.sampler_instance  # (it registered the request)
                if sampler is not None:
                    sampler.unregister_current(request)
            except Exception as exc:
                log_failure("profiler.stop", exc)
        else:
            self.hook_start.stop(active, from_finalizer=from_finalizer)
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

    def stand_down(self) -> None:
        """The server sends this app no more requests (its lifespan is ending): stop the
        ``SIGPROF`` timer now, from the loop's own thread, not after the loop's idle ticks.
        The loop closes next, and asyncio closes its self-pipe before it hands back the
        signal wakeup fd (where a server used ``loop.add_signal_handler``): a signal in
        between is reported as an unraisable exception. Never raises."""
        try:
            sampler = self.always_on_start.sampler_instance
            if sampler is not None:
                sampler.sigprof.stand_down()
        except Exception as exc:
            log_failure("profiler.stop", exc)

    def drain(self, timeout: float = 2.0) -> None:
        """Write what the writer holds and send what the exporter holds, each within
        ``timeout`` seconds: the server is shutting down (see the ASGI lifespan).
        Profiles the store or the exporter could not take in time are counted and
        logged: the process may end at once (uvicorn re-raises SIGTERM)."""
        if not self.writer.flush(timeout):
            self.writer.note_unwritten(timeout)
        if self.exporter is not None and not self.exporter.flush(timeout):
            self.exporter.note_unsent(timeout)

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
