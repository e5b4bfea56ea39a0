"""Datasets: toy 2D distributions (and, from the method issues, text corpora and persona language)."""

from jaxlab.data.persona import LinearPersonaToy, PersonaLanguage, linear_persona_toy
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
    "GaussianMixture",
    "TOY2D_DATASETS",
    "checkerboard",
    "concentric_rings",
    "eight_gaussians",
    "spirals",
    "toy2d_sampler",
    "two_moons",
]
__all__ += ["LinearPersonaToy", "PersonaLanguage", "linear_persona_toy"]

from jaxlab.data.text import TextCorpus, eval_windows, load_stdlib_corpus, random_windows, stdlib_files

__all__ += ["TextCorpus", "eval_windows", "load_stdlib_corpus", "random_windows", "stdlib_files"]
