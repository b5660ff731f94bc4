"""lmrec: sequential recommendation with pretrained language models.

Two families on one data layout and one evaluation protocol: ``lmrec.recformer`` (text-based, RecFormer)
and ``lmrec.generative`` (semantic IDs). The functions below mirror the ``lmrec`` CLI for both.
"""

from lmrec.api import (
    build_semantic_ids,
    evaluate,
    evaluate_generative,
    expand_vocab,
    finetune,
    prepare,
    recommend,
    recommend_all,
    recommend_generative,
    train_generative,
)
from lmrec.errors import DataError, LmrecError

__version__ = "0.1.0"
__all__ = ["prepare", "finetune", "evaluate", "recommend", "recommend_all", "build_semantic_ids", "expand_vocab",
           "train_generative", "evaluate_generative", "recommend_generative", "LmrecError", "DataError",
           "__version__"]
