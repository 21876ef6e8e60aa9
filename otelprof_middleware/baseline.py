"""Moved to :mod:`otelprof_middleware.viewer.baseline`; this name keeps old imports working."""

from __future__ import annotations

from .viewer.baseline import (
    ROOT_KEY,
    DiffNode,
    DiffRow,
    FunctionKey,
    combine,
    diff,
    diff_tree,
    function_times,
)

__all__ = [
    "ROOT_KEY",
    "DiffNode",
    "DiffRow",
    "FunctionKey",
    "combine",
    "diff",
    "diff_tree",
    "function_times",
]
