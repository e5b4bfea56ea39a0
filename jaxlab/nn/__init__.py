"""Flax Linen modules: velocity MLP, time embeddings, transformer LM, DiT, LoRA, compressed N:M Dense."""

from jaxlab.nn import lora, transformer
from jaxlab.nn.dit import DiT, DiTBlock
from jaxlab.nn.embeddings import TimeEmbedding, sinusoidal_embedding
from jaxlab.nn.lora import LoRADense
from jaxlab.nn.mlp import VelocityMLP
from jaxlab.nn.nm_dense import NMDense
from jaxlab.nn.transformer import Transformer, TransformerConfig, causal_lm_loss

__all__ = [
    "DiT",
    "DiTBlock",
    "LoRADense",
    "NMDense",
    "TimeEmbedding",
    "Transformer",
    "TransformerConfig",
    "VelocityMLP",
    "causal_lm_loss",
    "lora",
    "sinusoidal_embedding",
    "transformer",
]
