"""Flax Linen modules: velocity MLP, time embeddings, transformer LM, the pretrained decoder family (Llama /
Qwen2 / Gemma), DiT, LoRA, compressed N:M Dense."""

from jaxlab.nn import decoder, lora, transformer
from jaxlab.nn.decoder import Decoder, DecoderConfig
from jaxlab.nn.dit import DiT, DiTBlock
from jaxlab.nn.embeddings import TimeEmbedding, sinusoidal_embedding
from jaxlab.nn.grasp_hooks import RESID_SITES, grasp_intercept, residual_projection_hook
from jaxlab.nn.lora import LoRADense
from jaxlab.nn.mlp import VelocityMLP
from jaxlab.nn.nm_dense import NMDense
from jaxlab.nn.transformer import Transformer, TransformerConfig, causal_lm_loss

__all__ = [
    "Decoder",
    "DecoderConfig",
    "DiT",
    "DiTBlock",
    "LoRADense",
    "NMDense",
    "RESID_SITES",
    "TimeEmbedding",
    "Transformer",
    "TransformerConfig",
    "VelocityMLP",
    "causal_lm_loss",
    "decoder",
    "grasp_intercept",
    "lora",
    "residual_projection_hook",
    "sinusoidal_embedding",
    "transformer",
]
