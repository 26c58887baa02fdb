"""`evaluate` module: pearsonr computed offline (same arguments and outputs as the Hub's `pearsonr`).

    evaluate.load(sslcore.metrics.local_module_path("pearsonr"))
"""

import evaluate

from sslcore.metrics import module_info, pearsonr


class Pearsonr(evaluate.Metric):
    def _info(self):
        return module_info("pearsonr")

    def _compute(self, predictions, references, **kwargs):
        return pearsonr(predictions, references, **kwargs)
