"""selfsup text: corpora, tokenizers, packing and the text pretraining objectives."""

from textssl import mlm  # noqa: F401  (registers bert_mlm)
from textssl import word2vec  # noqa: F401  (registers word2vec)
from textssl import clm, electra, nsp, sop  # noqa: F401  (registers gpt_clm, electra_rtd, bert_nsp, albert_sop)
from textssl.finetune import finetune  # noqa: F401  (registers sequence_classification; textssl.finetune(...))
from textssl.mlm import MaskedLMObjective, MLMConfig

__all__ = ["MLMConfig", "MaskedLMObjective"]
