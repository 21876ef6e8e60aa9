"""Hook mode's start and stop: a concurrency slot, then pyinstrument's hook.

On a thread the hook stays on for the whole request (a thread serves one request at a
time); on an event loop the task factory puts it on during the request's own task steps
only (``_loop_hook``). At most ``max_concurrent`` hook-mode profiles run at once per
middleware; a request beyond that is not profiled (``skipped.concurrency_cap``).
"""

from __future__ import annotations

import asyncio
import functools
import sys
import threading
import types

from opentelemetry import trace
from opentelemetry.trace import SpanContext
from pyinstrument.stack_sampler import build_call_stack

from .._config import Config
from .._failsafe import count, log_failure
from .._request import RequestFacts
from ._active_profile import ActiveProfile, lazy_url
from ._loop_hook import install_task_factory
from ._request_profile import RequestProfile, current_request
from ._start_policy import StartPolicy
from ._thread_hook import ThreadHook, os_thread_id, thread_hook

__all__ = ["HookStart"]

_start_stacks: dict[tuple[int, ...], list[str]] = {}
_START_STACK_KEY_DEPTH = 2


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


class HookStart:
    """Starts and stops hook-mode profiles, within the concurrency cap.

    Args:
        config: the settings (``interval``, ``max_samples``, ``max_concurrent``).
        start_policy: tells a triggered request (its profile is always kept).
    """

    def __init__(self, config: Config, start_policy: StartPolicy) -> None:
        self._config = config
        self._start_policy = start_policy
        self._interval = config.interval
        self._lock = threading.Lock()
        self.slots_in_use = 0
        """Hook-mode profiles running now (each holds one of ``max_concurrent`` slots)."""

    def start(
        self,
        span: trace.Span,
        context: SpanContext,
        facts: RequestFacts,
    ) -> ActiveProfile | None:
        """:meth:`ProfilerCore.start <._engine.ProfilerCore.start>` for hook mode, once
        the request is chosen: a slot, the request's profile, the hook. None when the cap
        is reached or starting failed (counted and logged)."""
        with self._lock:
            if self.slots_in_use >= self._config.max_concurrent:
                count("skipped.concurrency_cap")
                return None
            self.slots_in_use += 1
        try:
            loop = asyncio._get_running_loop()
            request = RequestProfile(
                interval=self._interval,
                max_samples=self._config.max_samples,
                # On a loop the stem is found in the samples, as always-on's is. Frame 3
                # is the adapter's caller (this method, ProfilerCore.start, the adapter).
                start_call_stack=None if loop is not None else _start_stack(sys._getframe(3)),
            )
            token = current_request.set(request)
            hook: ThreadHook | None = None
            try:
                if loop is not None:  # the hook runs only in the request's own task steps
                    install_task_factory(loop)
                else:  # a thread serves one request at a time (greenlets share their OS
                    # thread's hook): the hook stays on
                    hook = thread_hook(self._interval)
                    if not hook.acquire():  # another profiler's hook: leave it alone
                        current_request.reset(token)
                        with self._lock:
                            self.slots_in_use -= 1
                        count("skipped.foreign_hook")
                        return None
            except BaseException:
                current_request.reset(token)
                raise
        except Exception as exc:
            with self._lock:
                self.slots_in_use -= 1
            log_failure("profiler.start", exc)
            return None
        trigger = facts.trigger
        request.url_factory = functools.partial(lazy_url, self._config, facts, context)
        return ActiveProfile(
            request,
            span,
            context,
            facts,
            token,
            hook=hook,
            triggered=trigger is not None
            and self._start_policy.is_triggered(trigger, facts.client_host),
        )

    def stop(self, active: ActiveProfile, *, from_finalizer: bool) -> None:
        """Take the hook off (or leave it to its thread) and give the slot back; never
        raises (a failure is counted and logged as ``profiler.stop``) but what an app's
        signal handler raised meanwhile (see ``_failsafe``).

        ``from_finalizer``: called by the garbage collector (see :class:`ThreadHook`).
        """
        try:
            hook = active.hook
            if hook is None:
                pass  # on a loop: each step of the request removed its hook
            elif hook.thread_id == os_thread_id():
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
            log_failure("profiler.stop", exc)  # (raises an app's signal handler's exception)
        finally:
            with self._lock:
                self.slots_in_use -= 1
