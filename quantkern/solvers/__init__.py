"""Solvers: one core loop (ops/solver.py), many methods. Add a method with a config in quantkern.methods,
its solver under `@register_solver(Config)` and one import line here."""
from .registry import METHODS, get_solver, register_solver  # noqa: F401
from .result import SolveResult  # noqa: F401
from .core import asym_objective, proxy_loss  # noqa: F401
from . import rtn, gptq, gptaq, snrq  # noqa: F401,E401  (binds the solvers)
from . import adaround, oac, yaqa  # noqa: F401,E401  (methods beyond the layer-wise proxy)
from .api import solve  # noqa: F401
