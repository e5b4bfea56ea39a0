"""jaxlab: GRASP, STEP and variance-reduced MeanFlow as composable pure-functional JAX pieces.

The public API is re-exported here; each subpackage owns its names through its own ``__all__``.
Private modules start with ``_``.
"""

from jaxlab import data, distributed, kernels, losses, metrics, nm, nn, training, transforms
from jaxlab.data import *
from jaxlab.kernels import nm_matmul, nm_matmul_reference
from jaxlab.losses import *
from jaxlab.metrics import *
from jaxlab.nn import LoRADense, NMDense, lora
from jaxlab.training import *
from jaxlab.transforms import *

__version__ = "0.1.0"

__all__ = (
    ["data", "distributed", "kernels", "losses", "metrics", "nm", "nn", "training", "transforms"]
    + list(data.__all__)
    + list(losses.__all__)
    + list(metrics.__all__)
    + list(transforms.__all__)
    + list(training.__all__)
    + ["lora", "LoRADense", "NMDense", "nm_matmul", "nm_matmul_reference"]
)
