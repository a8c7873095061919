"""Model-level driver: layer-by-layer quantization, checkpoints, the built-in model."""
from .checkpoint import CheckpointError, load, save_quantized  # noqa: F401
from .driver import Method, QuantReport, quantize_model, register_method  # noqa: F401
from . import grad_methods  # noqa: F401,E402  (registers the driver plug-ins oac, yaqa, adaround)
