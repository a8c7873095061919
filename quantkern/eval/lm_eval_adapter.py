"""lm-evaluation-harness adapter (imports lm_eval lazily; `pip install lm_eval==0.4.13`).

    from quantkern.eval.lm_eval_adapter import evaluate
    results = evaluate(model, tokenizer, tasks=["my_local_task"], include_path="tasks/")

lm_eval's built-in tasks download their data and fail offline; point `include_path` at task YAMLs that
read local files.
"""
from __future__ import annotations


def _lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise ImportError("the lm-eval adapter needs lm_eval: pip install lm_eval==0.4.13") from e
    return lm_eval, HFLM


def as_lm(model, tokenizer, batch_size: int = 1, max_length: int | None = None):
    """Wrap an in-memory (quantized) model as an lm_eval LM."""
    _, HFLM = _lm_eval()
    kw = {"max_length": max_length} if max_length else {}
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **kw)


def evaluate(model, tokenizer, tasks, include_path=None, limit=None, batch_size: int = 1, **kwargs) -> dict:
    lm_eval, _ = _lm_eval()
    task_manager = None
    if include_path is not None:
        from lm_eval.tasks import TaskManager

        task_manager = TaskManager(include_path=str(include_path))
    return lm_eval.simple_evaluate(model=as_lm(model, tokenizer, batch_size), tasks=list(tasks), limit=limit,
                                   task_manager=task_manager, **kwargs)
