"""Solver registry: `@register_solver(Config)` binds the function `quantkern.solve` runs for a method.

The method names and their configs live in quantkern.methods (METHODS); this module only attaches each
config's solver. A solver is `fn(W, H, spec, log, **params) -> SolveResult`: W [m, n] fp32 and H [n, n]
fp32 are already validated (shape, finite), `log` is the dict that becomes SolveResult.log, params are
the config's `solver_options()` plus per-layer inputs (D, H_out, ...). Unknown keyword arguments must
raise TypeError (so typos in solve(...) are caught).
"""
from __future__ import annotations

from typing import Callable

from ..methods import METHODS, MethodConfig, config_class

__all__ = ["METHODS", "get_solver", "register_solver"]


def register_solver(config: type[MethodConfig]):
    """Decorator: `fn` is the solver of the method `config` (a registered MethodConfig subclass)."""
    if not (isinstance(config, type) and issubclass(config, MethodConfig) and METHODS.get(config.name) is config):
        raise TypeError(f"register_solver needs a config class registered in quantkern.methods, got {config!r}")

    def deco(fn):
        old = config.__dict__.get("solver")
        if old is not None and old.__func__ is not fn:
            raise ValueError(f"method {config.name!r} already has a solver")
        config.solver = staticmethod(fn)
        return fn

    return deco


def get_solver(name: str) -> Callable:
    fn = config_class(name).solver  # (a config subclass without its own solver runs its parent's)
    if fn is None:
        raise ValueError(f"method {name!r} has no solver registered (import its module in quantkern/solvers/__init__.py)")
    return fn
