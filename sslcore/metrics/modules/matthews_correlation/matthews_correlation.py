"""`evaluate` module: matthews_correlation computed offline (same arguments and outputs as the Hub's `matthews_correlation`).

    evaluate.load(sslcore.metrics.local_module_path("matthews_correlation"))
"""

import evaluate

from sslcore.metrics import matthews_correlation, module_info


class MatthewsCorrelation(evaluate.Metric):
    def _info(self):
        return module_info("matthews_correlation")

    def _compute(self, predictions, references, **kwargs):
        return matthews_correlation(predictions, references, **kwargs)
