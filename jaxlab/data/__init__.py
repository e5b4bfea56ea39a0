"""Datasets: toy 2D distributions, the synthetic persona language(s), the stdlib byte corpus, SFT chat data."""

from jaxlab.data.persona import LinearPersonaToy, PersonaLanguage, linear_persona_toy
from jaxlab.data.sft import ChatTemplate, pack_examples, read_jsonl, render_example, sft_batches
from jaxlab.data.text import TextCorpus, eval_windows, load_stdlib_corpus, random_windows, stdlib_files
from jaxlab.data.toy2d import (
    TOY2D_DATASETS,
    GaussianMixture,
    checkerboard,
    concentric_rings,
    eight_gaussians,
    spirals,
    toy2d_sampler,
    two_moons,
)

__all__ = [
    "ChatTemplate",
    "GaussianMixture",
    "LinearPersonaToy",
    "PersonaLanguage",
    "TOY2D_DATASETS",
    "TextCorpus",
    "checkerboard",
    "concentric_rings",
    "eight_gaussians",
    "eval_windows",
    "linear_persona_toy",
    "load_stdlib_corpus",
    "pack_examples",
    "read_jsonl",
    "render_example",
    "sft_batches",
    "random_windows",
    "spirals",
    "stdlib_files",
    "toy2d_sampler",
    "two_moons",
]
