"""Pretrained checkpoints in and out (Hugging Face layout, safetensors) and tokenizers."""

from jaxlab.models.hf import (
    SUPPORTED_FAMILIES,
    config_from_hf,
    config_to_hf,
    decoder_from_hf,
    hf_tensor_map,
    load_hf,
    save_hf,
)
from jaxlab.models.tokenizer import Tokenizer, load_tokenizer, train_byte_level_bpe

__all__ = [
    "Tokenizer",
    "SUPPORTED_FAMILIES",
    "config_from_hf",
    "config_to_hf",
    "decoder_from_hf",
    "hf_tensor_map",
    "load_hf",
    "load_tokenizer",
    "save_hf",
    "train_byte_level_bpe",
]
