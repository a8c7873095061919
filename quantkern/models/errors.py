"""The one error for a model quantkern cannot take (raised before any calibration work; the CLI prints it as one
line). A ValueError, so callers that caught ValueError before keep working."""


class UnsupportedModelError(ValueError):
    pass
