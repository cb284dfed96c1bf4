"""Evaluation: generation metrics (torch-fidelity + our feature network), accuracy, sample grids, the report,
and the paper's FID / sFID / IS / precision-recall (`python -m dpt_fast.eval`, `dpt_fast.eval.adm`).

    from dpt_fast.eval import generation_metrics, save_grid, classifier_accuracy, evaluate
    from dpt_fast.eval.report import write_report

Names are imported lazily so that `dpt_fast.eval.report` (called after every stage) does not pay for
importing torch-fidelity.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "generation_metrics": ".fidelity",
    "class_agreement": ".fidelity",
    "classifier_accuracy": ".accuracy",
    "top1": ".accuracy",
    "per_class_accuracy": ".accuracy",
    "save_grid": ".grid",
    "load_feature_net": ".feature_nets",
    "shipped_feature_net": ".feature_nets",
    "write_report": ".report",
    "evaluate": ".adm",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dpt_fast.eval' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
