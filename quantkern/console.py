"""What the long commands print: a verbosity level, one progress bar, short notes and a closing summary.

    QUIET    errors, warnings and the final result (a path, a perplexity)
    NORMAL   + one progress bar (on a terminal only), one-line notes, the summary table   (default)
    VERBOSE  + one row per quantized module (they always go to the checkpoint's quant_log.jsonl)

Bars draw only when stderr is a terminal (tqdm's disable=None), so piped or logged output carries no
carriage returns or escape codes; everything else is plain lines on stdout.
"""
from __future__ import annotations

import contextlib
import resource
import sys
import warnings

QUIET, NORMAL, VERBOSE = 0, 1, 2


def level_from(quiet: bool = False, verbose: bool = False) -> int:
    if quiet and verbose:
        raise SystemExit("quantkern: --quiet and --verbose contradict each other; pass one")
    return QUIET if quiet else VERBOSE if verbose else NORMAL


def bar(iterable=None, level: int = NORMAL, **kw):
    """A tqdm bar that shows at NORMAL and above, and only on a terminal."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=None if level >= NORMAL else True, dynamic_ncols=True, **kw)


def write(line: str, level: int, at: int = NORMAL) -> None:
    """Print `line` if the run's level is at least `at`, without tearing a bar that is drawing."""
    if level < at:
        return
    from tqdm.auto import tqdm

    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


def peak_memory_bytes() -> int:
    """Peak resident memory of this process (and the peak CUDA allocation, if CUDA was used), in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            peak += torch.cuda.max_memory_allocated()
    except Exception:  # noqa: BLE001 - memory reporting never fails a run
        pass
    return peak


def size(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


def seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{int(s // 60)} min {s % 60:02.0f} s"


def table(rows, indent: str = "  ") -> str:
    """Rows of cells as plain aligned text (first column left, the others left too: they are prose)."""
    rows = [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in rows if len(r) > i) for i in range(max(len(r) for r in rows))]
    return "\n".join(indent + "  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip() for r in rows)


@contextlib.contextmanager
def one_line_warnings():
    """Within: warnings print as `warning: message` (no source path and code line), for command-line users."""
    before = warnings.formatwarning
    warnings.formatwarning = lambda message, category, *a, **k: f"warning: {message}\n"
    try:
        yield
    finally:
        warnings.formatwarning = before


def quiet_libraries() -> None:
    """Command-line runs show one bar: transformers' weight-loading bars and info logs stay off."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # transformers is a dependency; a broken install fails later with a clearer error
        pass
