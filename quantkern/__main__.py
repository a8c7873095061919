"""`python -m quantkern ...` is the `quantkern` console script."""
from .cli import main

raise SystemExit(main())
