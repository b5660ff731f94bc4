"""lmrec: sequential recommendation with pretrained language models.

Two families on one data layout and one evaluation protocol: ``lmrec.recformer`` (text-based, RecFormer)
and ``lmrec.generative`` (semantic IDs). The functions below mirror the ``lmrec`` CLI.
"""

from lmrec.api import evaluate, finetune, prepare, recommend
from lmrec.errors import DataError, LmrecError

__version__ = "0.1.0"
__all__ = ["prepare", "finetune", "evaluate", "recommend", "LmrecError", "DataError", "__version__"]
