"""Op dispatch. Each submodule registers its backends; `registry.choose` picks one per call."""
from . import registry  # noqa: F401
from . import pack  # noqa: F401
from . import fake  # noqa: F401
from .registry import backends, choose, call  # noqa: F401
from . import solver  # noqa: F401,E402
from . import qgemm  # noqa: F401
from . import qgemm_gpu  # noqa: F401
from . import solver_gpu  # noqa: F401
