"""Is this process's threading monkey-patched (gevent, eventlet)?"""

from __future__ import annotations

import sys

__all__ = ["green_threads"]


def green_threads() -> str | None:
    """``"gevent"`` or ``"eventlet"`` when that library has monkey-patched threading.

    Then ``threading.get_ident()`` names the running greenlet, every greenlet of a
    worker runs on one OS thread, and the sampler's thread is a greenlet too: it never
    runs while a request holds the CPU, and ``sys._current_frames()`` knows OS threads
    only. Looked up in ``sys.modules``: nothing is imported.
    """
    for module_name, check, target, name in _MONKEY_PATCHERS:
        patcher = sys.modules.get(module_name)
        if patcher is None:
            continue
        try:
            if getattr(patcher, check)(target):
                return name
        except Exception:
            pass
    return None


_MONKEY_PATCHERS = (
    # (module, its "is this patched?" function, what it patches, the name we log)
    ("gevent.monkey", "is_module_patched", "threading", "gevent"),
    ("eventlet.patcher", "is_monkey_patched", "thread", "eventlet"),
)
