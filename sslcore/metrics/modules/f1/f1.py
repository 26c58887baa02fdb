"""`evaluate` module: f1 computed offline (same arguments and outputs as the Hub's `f1`).

    evaluate.load(sslcore.metrics.local_module_path("f1"))
"""

import evaluate

from sslcore.metrics import f1, module_info


class F1(evaluate.Metric):
    def _info(self):
        return module_info("f1")

    def _compute(self, predictions, references, **kwargs):
        return f1(predictions, references, **kwargs)
