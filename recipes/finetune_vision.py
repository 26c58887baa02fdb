"""Fine-tune a pretrained vision backbone (or the same one from random init) on labelled images, over seeds.

    python recipes/finetune_vision.py --model.path runs/simclr_tiny/model --data.source fashion-mnist
    python recipes/finetune_vision.py --config recipes/configs/vision_finetune_fashion_mnist.yaml \
        --split.train_examples 1000 --seeds [0,1,2]
    python recipes/finetune_vision.py --config recipes/configs/vision_finetune_fashion_mnist.yaml --model.init random
    python recipes/finetune_vision.py --help   # the values it would use

Every weight is trained (`AutoModelForImageClassification` from the export) on the shared trainer, with
early stopping on a held-out validation split; prints mean ± std of the test scores and writes them (per
seed and overall) under train.output_dir. Each run exports a folder stock
`pipeline("image-classification")` loads, its model card carrying the scores. A mistake prints one line
and exits with status 2; `--debug` shows the traceback.
"""

from __future__ import annotations

from sslcore.api import finetune_main
from visionssl.data import list_sources
from visionssl.finetune import build_vision_finetune_config, finetune


def main(argv: list[str] | None = None):
    return finetune_main(argv, script="recipes/finetune_vision.py", build_config=build_vision_finetune_config,
                         finetune=finetune, catalogue_title="image sources (data.source)", catalogue=list_sources)


if __name__ == "__main__":
    main()
