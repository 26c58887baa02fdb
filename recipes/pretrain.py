"""Pretrain any registered objective from a YAML preset.

    accelerate launch recipes/pretrain.py --config recipes/configs/bert_mlm_tiny.yaml
    accelerate launch recipes/pretrain.py --config recipes/configs/bert_mlm_tiny.yaml --train.max_steps 50
    accelerate launch recipes/pretrain.py --config recipes/configs/bert_mlm_tiny.yaml --resume
    python recipes/pretrain.py --config recipes/configs/bert_mlm_tiny.yaml --help
"""

from sslcore.api import main

if __name__ == "__main__":
    main()
