"""Loss-landscape geometry: curvature, interpolation barriers, distances and flatness.

Every tool takes a plain closure ``f(params) -> scalar`` (or ``g(params) -> scalar |
dict of scalars`` for paths), so it works with any model: flax, Equinox or
hand-written. `classification_objective` builds such a closure for a flax
classifier. Models with BatchNorm should close over their ``model_state`` and run
in eval mode (``train=False``, running statistics), so that ``f`` is a fixed
function of the parameters; `classification_objective` does exactly that.

* Curvature: `hvp` (forward-over-reverse Hessian-vector product),
  `top_hessian_eigenvalues` (Lanczos with full reorthogonalisation, or power
  iteration with deflation), `hessian_trace` (Hutchinson with Rademacher probes).
* Paths: `linear_path`, `barrier_height`, `linear_barrier`, `instability`
  (Frankle et al. 2020, arXiv 1912.05671).
* Distances: `l2_distance`, `cosine_similarity` (optionally restricted by a mask),
  `mask_overlap` (Jaccard index of two boolean masks).
* Flatness: `filter_normalized_direction` (Li et al. 2018, arXiv 1712.09913) and
  `flatness`, the distance along random filter-normalised directions before the
  loss rises by a threshold.

Practical notes. The iterative tools compile ``f`` inside a loop; the compiled program
is cached per ``f`` object (identity), so reuse one closure for repeated calls at the
same shapes, and treat ``f`` as pure. Data closed over by ``f`` becomes a constant of
the program: estimate curvature on a subset (a few thousand examples) rather than a
whole large training set. Lanczos keeps ``num_iters + 1`` vectors of the size of the
parameters; `flatness` keeps ``num_directions``. When interpolating BatchNorm
networks, ``f`` uses the running statistics it closes over (one endpoint's, say);
Frankle et al. do the same at evaluation time.

Modules: `_objectives` (the closure of a classifier), `_curvature`, `_interpolation`
(paths and barriers), `_distances`, `_flatness`, `_util` (constants and checks). This is
infrastructure: it imports no method module.
"""

from wspace.landscape._curvature import hessian_trace, hvp, top_hessian_eigenvalues
from wspace.landscape._distances import cosine_similarity, l2_distance, mask_overlap
from wspace.landscape._flatness import filter_normalized_direction, flatness
from wspace.landscape._interpolation import barrier_height, instability, linear_barrier, linear_path
from wspace.landscape._objectives import classification_objective
from wspace.landscape._util import EIGEN_METHODS, METRICS, PATH_MODES

__all__ = [
    "EIGEN_METHODS",
    "METRICS",
    "PATH_MODES",
    "barrier_height",
    "classification_objective",
    "cosine_similarity",
    "filter_normalized_direction",
    "flatness",
    "hessian_trace",
    "hvp",
    "instability",
    "l2_distance",
    "linear_barrier",
    "linear_path",
    "mask_overlap",
    "top_hessian_eigenvalues",
]
