"""`evaluate` module: spearmanr computed offline (same arguments and outputs as the Hub's `spearmanr`).

    evaluate.load(sslcore.metrics.local_module_path("spearmanr"))
"""

import evaluate

from sslcore.metrics import module_info, spearmanr


class Spearmanr(evaluate.Metric):
    def _info(self):
        return module_info("spearmanr")

    def _compute(self, predictions, references, **kwargs):
        return spearmanr(predictions, references, **kwargs)
