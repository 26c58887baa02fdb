"""`evaluate` module: accuracy computed offline (same arguments and outputs as the Hub's `accuracy`).

    evaluate.load(sslcore.metrics.local_module_path("accuracy"))
"""

import evaluate

from sslcore.metrics import accuracy, module_info


class Accuracy(evaluate.Metric):
    def _info(self):
        return module_info("accuracy")

    def _compute(self, predictions, references, **kwargs):
        return accuracy(predictions, references, **kwargs)
