"""Method registry: `@register_method("name")` adds a solver that `quantkern.solve` can dispatch to.

A method is `fn(W, H, spec, log, **params) -> SolveResult`. W [m, n] fp32 and H [n, n] fp32 are
already validated (shape, finite); `log` is the dict that becomes SolveResult.log. Unknown keyword
arguments must raise TypeError (so typos in solve(...) are caught). Other helpers add methods
(adaround, oac, yaqa, ...) with one import line in quantkern/solvers/__init__.py.
"""
from __future__ import annotations

import inspect
from typing import Callable

METHODS: dict[str, Callable] = {}


def register_method(name: str):
    def deco(fn):
        if name in METHODS and METHODS[name] is not fn:
            raise ValueError(f"solver method {name!r} registered twice")
        METHODS[name] = fn
        return fn

    return deco


def get_method(name: str) -> Callable:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {sorted(METHODS)}")
    return METHODS[name]


class MethodOptionError(ValueError):
    """A keyword the method does not take."""


def check_options(name: str, params: dict) -> None:
    """Raise ValueError naming any key of params that method `name` does not take (checked up front, so
    a typo fails before calibration rather than at the first layer). Methods that forward **params to
    another solver are checked when they run."""
    sig = inspect.signature(get_method(name)).parameters
    if any(p.kind is p.VAR_KEYWORD for p in sig.values()):
        return
    options = [k for k in sig if k not in ("W", "H", "spec", "log")]
    unknown = sorted(set(params) - set(options))
    if unknown:
        raise MethodOptionError(f"method {name!r} has no option(s) {unknown}; its options: {options}")
