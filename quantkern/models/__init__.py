"""Model-level driver: layer-by-layer quantization, checkpoints, the built-in model."""
from .checkpoint import CheckpointError, load, save_quantized  # noqa: F401
from .driver import Plugin, QuantReport, quantize, quantize_model, register_plugin  # noqa: F401
from . import grad_methods  # noqa: F401,E402  (binds the driver plug-ins of oac, yaqa, adaround)
