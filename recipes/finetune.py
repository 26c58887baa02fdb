"""Fine-tune (or linear-probe) a pretrained encoder on a labelled task over several seeds.

    accelerate launch recipes/finetune.py --config recipes/configs/finetune_movie_sentiment.yaml
    accelerate launch recipes/finetune.py --config recipes/configs/finetune_movie_sentiment.yaml \
        --model.path runs/bert_mlm_tiny/model --protocol probe --seeds [0,1,2,3,4]
    accelerate launch recipes/finetune.py --config recipes/configs/finetune_movie_sentiment.yaml --model.init random
    # per-arm model selection: every rate per seed, the best mean validation score kept, only it scored on test
    accelerate launch recipes/finetune.py --config recipes/configs/finetune_movie_sentiment.yaml \
        --grid.learning_rates [1e-4,3e-4,1e-3]
    # 300 labelled examples per seed (stratified, fixed per seed): one point of a label-budget curve
    accelerate launch recipes/finetune.py --config recipes/configs/finetune_movie_sentiment.yaml --label_budget 300
    python recipes/finetune.py --config recipes/configs/finetune_movie_sentiment.yaml --help   # the values it would use

Prints mean ± std of the test scores (and, with a grid, what was chosen on validation) and writes them (per
seed and overall) under train.output_dir;
each full fine-tuning run exports a stock `AutoModelForSequenceClassification` folder whose model
card carries the scores. A mistake (a bad value, a missing model folder) prints one line and exits
with status 2; `--debug` shows the traceback.
"""

from __future__ import annotations

from sslcore.api import finetune_main
from textssl.finetune import build_finetune_config, finetune
from textssl.tasks import describe_tasks


def main(argv: list[str] | None = None):
    return finetune_main(argv, script="recipes/finetune.py", build_config=build_finetune_config, finetune=finetune,
                         catalogue_title="built-in tasks (task.name)", catalogue=describe_tasks)


if __name__ == "__main__":
    main()
