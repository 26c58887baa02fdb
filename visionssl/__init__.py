"""Vision self-supervised learning on the shared trainer: SimCLR, MoCo v2/v3, BYOL, SimSiam, RotNet,
and full fine-tuning of their exports (`visionssl.finetune`).

Importing the package registers its objectives (`objective: simclr` etc. in a config).
"""

from visionssl import byol, finetune, moco, rotation, simclr, simsiam  # noqa: F401  (registers the objectives)
