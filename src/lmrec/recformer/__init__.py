"""RecFormer: the text-based family (items as key/value text, a Longformer over the user's history)."""

from transformers import AutoConfig, AutoModel

from lmrec.recformer.configuration_recformer import RecformerConfig
from lmrec.recformer.modeling_recformer import RecformerForSeqRec, RecformerModel
from lmrec.recformer.tokenization_recformer import RecformerTokenizer

AutoConfig.register("recformer", RecformerConfig, exist_ok=True)
AutoModel.register(RecformerConfig, RecformerModel, exist_ok=True)

__all__ = ["RecformerConfig", "RecformerModel", "RecformerForSeqRec", "RecformerTokenizer"]
