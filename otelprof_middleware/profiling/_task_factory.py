"""One task factory per event loop, for both modes: a new task joins its creator's request.

asyncio copies the creating context into a task, so a task created while a profiled
request is current belongs to that request. What each mode needs of it:

* **hook mode** wraps the task's coroutine, so pyinstrument's hook runs only during
  the task's own steps (:func:`wrap_coroutines`, from ``_loop_hook``);
* **always-on**, on a loop the sampler *thread* ticks, records the task, so a tick can
  map the running task to its request (:func:`record_tasks`, from
  ``always_on._registry``). A loop ticked by ``SIGPROF`` needs neither: the handler
  runs in the interrupted task's context.

The factory is installed once per loop and chains whatever factory the loop had (an
eager task factory, a framework's own). A task created while no request is current
costs one contextvar read more.
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import Callable, Coroutine
from typing import Any

from .._failsafe import log_failure
from ._request_profile import RequestProfile, current_request

__all__ = ["record_tasks", "wrap_coroutines"]

Wrapper = Callable[[Coroutine[Any, Any, Any], RequestProfile], Coroutine[Any, Any, Any]]


class _Roles:
    """What the loop's factory does for each mode (set by the modes, read per task)."""

    __slots__ = ("forget", "tasks", "wrap")

    def __init__(self) -> None:
        self.wrap: Wrapper | None = None  # hook mode: wraps a request's coroutine
        self.tasks: dict[asyncio.Task[Any], RequestProfile] | None = None  # always-on
        self.forget: Callable[[Any], None] | None = None  # drops a done task from ``tasks``


def wrap_coroutines(loop: asyncio.AbstractEventLoop, wrap: Wrapper) -> None:
    """Wrap, with ``wrap(coro, request)``, the coroutine of each task a hook-mode request
    creates on ``loop`` (idempotent). ``wrap`` may raise: the task then runs unwrapped."""
    _roles(loop).wrap = wrap


def record_tasks(
    loop: asyncio.AbstractEventLoop, tasks: dict[asyncio.Task[Any], RequestProfile]
) -> None:
    """Record in ``tasks`` each task an always-on request creates on ``loop``, until done.

    The dict is the always-on registry's: after ``testing.reset`` a new sampler's
    registry replaces the old one's here.
    """
    roles = _roles(loop)
    if roles.tasks is not tasks:

        def forget(task: Any) -> None:
            tasks.pop(task, None)

        roles.tasks, roles.forget = tasks, forget


def _roles(loop: asyncio.AbstractEventLoop) -> _Roles:
    """The roles of ``loop``'s factory, installing the factory first if it is not ours."""
    previous = loop.get_task_factory()
    roles: _Roles | None = getattr(previous, "otelprof_roles", None)
    if roles is not None:
        return roles
    roles = _Roles()
    eager_constructor = _eager_constructor(previous)

    def create(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        if eager_constructor is not None:  # (``eager_start`` is in kwargs, or not: anyio)
            return eager_constructor(coro, loop=loop, **kwargs)  # type: ignore[no-any-return]
        if previous is not None:
            return previous(loop, coro, **kwargs)  # type: ignore[return-value]
        return asyncio.Task(coro, loop=loop, **kwargs)

    def factory(
        loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], **kwargs: Any
    ) -> asyncio.Task[Any]:
        request = current_request.get()
        if request is None or request.closed:
            return create(loop, coro, **kwargs)
        if not request.continuous:
            wrap = roles.wrap
            if wrap is not None and type(coro) is types.CoroutineType:
                try:
                    coro = wrap(coro, request)
                except Exception as exc:
                    log_failure("profiler.task", exc)
            return create(loop, coro, **kwargs)
        task = create(loop, coro, **kwargs)
        tasks, forget = roles.tasks, roles.forget
        if tasks is not None and forget is not None:
            tasks[task] = request
            task.add_done_callback(forget)
        return task

    installed: Callable[..., Any] = factory
    if eager_constructor is not None:
        # anyio recognises asyncio's eager factory by its code and, to start its task
        # groups' tasks lazily, calls the task constructor that factory closes over. So
        # an eager loop keeps a factory of that shape, with ours as its constructor.
        def construct(coro: Any, *, loop: asyncio.AbstractEventLoop, **kwargs: Any) -> Any:
            return factory(loop, coro, **kwargs)

        installed = asyncio.create_eager_task_factory(construct)  # type: ignore[attr-defined,unused-ignore]
    installed.otelprof_roles = roles  # type: ignore[attr-defined]
    loop.set_task_factory(installed)
    return roles


def _eager_constructor(factory: object) -> Callable[..., Any] | None:
    """The task constructor of asyncio's eager task factory (``eager_task_factory``,
    ``create_eager_task_factory(constructor)``), recognised as anyio does; else None."""
    eager = getattr(asyncio, "eager_task_factory", None)  # (3.12+)
    if eager is None or getattr(factory, "__code__", None) is not eager.__code__:
        return None
    closure = getattr(factory, "__closure__", None)
    constructor = closure[0].cell_contents if closure else None
    return constructor if callable(constructor) else None
