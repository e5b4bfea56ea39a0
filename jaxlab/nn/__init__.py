"""Flax Linen modules: velocity MLP, time embeddings (transformer, DiT, LoRA come with the method issues)."""

from jaxlab.nn import lora
from jaxlab.nn.dit import DiT, DiTBlock
from jaxlab.nn.embeddings import TimeEmbedding, sinusoidal_embedding
from jaxlab.nn.lora import LoRADense
from jaxlab.nn.mlp import VelocityMLP
from jaxlab.nn.nm_dense import NMDense

__all__ = ["TimeEmbedding", "VelocityMLP", "sinusoidal_embedding"]
__all__ += ["NMDense"]

__all__ += ["LoRADense", "lora"]

__all__ += ["DiT", "DiTBlock"]

from jaxlab.nn import transformer
from jaxlab.nn.transformer import Transformer, TransformerConfig, causal_lm_loss

__all__ += ["Transformer", "TransformerConfig", "causal_lm_loss", "transformer"]
