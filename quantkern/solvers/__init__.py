"""Solvers: one core loop (ops/solver.py), many methods. Add a method with @register_method and
one import line here."""
from .registry import METHODS, get_method, register_method  # noqa: F401
from .result import SolveResult  # noqa: F401
from .core import asym_objective, proxy_loss  # noqa: F401
from . import rtn, gptq, gptaq, snrq  # noqa: F401,E401  (registers the methods)
from . import adaround, oac, yaqa  # noqa: F401,E401  (methods beyond the layer-wise proxy)
from .api import solve  # noqa: F401
