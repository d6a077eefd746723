"""A thin bridge to lm-evaluation-harness (``pip install megatron-prune[eval]``) for ``eval --tasks``.

The model is loaded here (local folder, no hub) and handed to lm-eval's ``HFLM``; task data comes from the
hub unless the task is local (``--include-path`` with task YAMLs whose dataset is a local JSON file).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from megatron.prune.errors import PruneError


def run_tasks(model, tok, tasks: Sequence[str], include_path: Sequence[Path] | None = None,
              batch_size: int = 4, limit: int | None = None,
              num_fewshot: int | None = None) -> dict[str, dict[str, Any]]:
    """Run lm-eval ``tasks`` on an already loaded HF model; returns {task: {metric: value}}."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise PruneError("--tasks needs lm-evaluation-harness: pip install 'megatron-prune[eval]' "
                         f"(or pip install lm-eval) ({e})") from e
    manager = TaskManager(include_path=[str(p) for p in include_path] if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        hint = "" if include_path else " (local task YAMLs need --include-path DIR)"
        raise PruneError(f"unknown lm-eval task(s) {', '.join(unknown)}{hint}; list them with `lm-eval ls tasks`")
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size)
    try:
        out = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                              num_fewshot=num_fewshot, log_samples=False, bootstrap_iters=0)
    except OSError as e:  # no network (datasets' ConnectionError), a dataset not in the cache, a missing local file
        raise PruneError(f"--tasks {' '.join(tasks)}: could not load a task's data ({type(e).__name__}: {e}). Hub "
                         "tasks download their data: run where the Hugging Face Hub is reachable once (it is cached "
                         "in HF_DATASETS_CACHE), or use local task YAMLs (--include-path DIR)") from None
    return {task: {k: v for k, v in metrics.items() if k != "alias"} for task, metrics in out["results"].items()}


def format_results(results: dict[str, dict[str, Any]]) -> list[str]:
    """One line per task: ``task: metric value, ...`` (stderr entries left out)."""
    lines = []
    for task, metrics in results.items():
        shown = [f"{k.split(',')[0]} {v:.4f}" for k, v in metrics.items()
                 if isinstance(v, (int, float)) and "stderr" not in k]
        lines.append(f"{task}: " + ", ".join(shown))
    return lines
