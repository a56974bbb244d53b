"""The Hessian of the SFT loss at selected params: Hessian-vector products, top eigenvalues, trace.

`Curvature` gives the loss of N fixed batches as a function of the params at some paths (merged back into the
frozen rest) and its Hessian-vector product H v by forward over reverse (`jax.jvp` of `jax.grad`), one batch at a
time inside a `lax.scan`, so memory does not grow with N. `lanczos` and `hutchinson` take any `matvec` (v -> H v
on pytrees shaped like the point x), jitted once by the caller and shared by both, and never form H. Vectors are
float32 pytrees laid out like x by `constrain` (on a mesh, sharded like the params they mirror); inner products
sum every leaf in float32.

- `lanczos`: m steps of Lanczos with full reorthogonalisation (classical Gram-Schmidt, twice) against the whole
  basis, kept as one stacked array per leaf ([m + 1, *leaf shape]: one compiled update serves every step). The
  Ritz values of the m x m tridiagonal matrix approximate H's extreme eigenvalues from inside; each comes with
  its residual |beta_m s_m|, a bound on its distance to an eigenvalue of H. Memory: m + 1 vectors the size of x.
- `hutchinson`: tr(H) ~ mean over probes v of v^T H v. Rademacher probes (entries +-1) give an unbiased estimate
  with variance 2 (||H||_F^2 - sum_i H_ii^2) / probes; the standard error is estimated from the probes' spread.
  `kind="hadamard"` uses rows of a Sylvester-Hadamard matrix with one random sign per coordinate: unbiased too,
  and exact (every off-diagonal term cancels) once probes >= the power of two at or above the dimension.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from mft_jax import losses, model, trees
from mft_jax.config import LlamaConfig

Tree = Any
MatVec = Callable[[Tree], Tree]  # v -> H v, a pytree like x (the caller jits it: one compiled HVP serves all)
Constrain = Callable[..., Tree]  # constrain(v, stacked=False): v laid out like x (stacked: a leading basis axis)


def _identity(v, stacked=False):
    return v


def tree_vdot(a: Tree, b: Tree) -> jax.Array:
    """sum over leaves of <a, b>, float32."""
    return sum(jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32)) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def progress_bar(total: int, desc: str, enabled: bool):
    return tqdm(total=total, desc=desc, file=sys.stderr, disable=not enabled, dynamic_ncols=True, leave=False)


# --------------------------------------------------------------------------------------------------------
# The SFT loss and its Hessian-vector product
# --------------------------------------------------------------------------------------------------------

def merge(params, flat: dict):
    """params with the leaves at flat's paths ({path: leaf}) replaced; params is not modified."""
    return trees.merge(params, trees.unflatten(flat))


@dataclasses.dataclass(frozen=True)
class Curvature:
    """The loss, H v and the vectors' layout as pure functions (hashable: a static jit argument).
    operand = (params, batches [N, B, L]); x = the selected params ({path: float32 array})."""

    cfg: LlamaConfig
    compute_dtype: str = "float32"
    remat: str = "none"
    loss_chunk: int = 0
    shardings: tuple = ()  # ((path, NamedSharding), ...) of x's leaves; () leaves the layout to XLA

    def batch_sum(self, params, batch) -> jax.Array:
        """sum(w * nll) of one batch (the loss's numerator), as training computes it (attention: xla)."""
        options = model.Options(compute_dtype=self.compute_dtype, remat=self.remat)
        return losses.model_sft_sums(self.cfg, params, batch, options=options, loss_chunk=self.loss_chunk)[0]

    def _over_batches(self, per_batch, batches, init):
        def body(acc, batch):
            return jax.tree.map(jnp.add, acc, per_batch(batch)), None
        total = jax.lax.scan(body, init, batches)[0]
        den = jnp.maximum(jnp.sum(batches["loss_weights"].astype(jnp.float32)), 1e-12)
        return jax.tree.map(lambda t: t / den, total)

    def loss(self, operand, x) -> jax.Array:
        params, batches = operand
        return self._over_batches(lambda b: self.batch_sum(merge(params, x), b), batches, jnp.zeros((), jnp.float32))

    def matvec(self, operand, x, v):
        """H v by forward over reverse: the jvp of each batch's gradient, summed over batches."""
        params, batches = operand

        def per_batch(batch):
            grad = jax.grad(lambda y: self.batch_sum(merge(params, y), batch))
            return jax.jvp(grad, (x,), (v,))[1]
        return self._over_batches(per_batch, batches, jax.tree.map(jnp.zeros_like, x))

    def constrain(self, v, stacked: bool = False):
        if not self.shardings:
            return v
        layout = dict(self.shardings)

        def one(path, a):
            s = layout[path]
            s = NamedSharding(s.mesh, P(None, *s.spec)) if stacked else s
            return jax.lax.with_sharding_constraint(a, s)
        return {path: one(path, a) for path, a in v.items()}


# --------------------------------------------------------------------------------------------------------
# Probes
# --------------------------------------------------------------------------------------------------------

def probe(x: Tree, key: jax.Array, index, kind: str = "rademacher") -> Tree:
    """Probe number `index`, a float32 pytree like x with entries +-1.

    rademacher: independent signs from (key, index). hadamard: row `index` of the Sylvester-Hadamard matrix,
    h[r, i] = (-1)^popcount(r & i) over the flat coordinate i of the whole pytree (leaves in order), times a
    random sign per coordinate drawn from `key` alone (the same for every row)."""
    leaves, treedef = jax.tree.flatten(x)
    out, offset = [], 0
    for i, a in enumerate(leaves):
        if kind == "rademacher":
            v = jax.random.rademacher(jax.random.fold_in(jax.random.fold_in(key, index), i), a.shape, jnp.float32)
        elif kind == "hadamard":
            sign = jax.random.rademacher(jax.random.fold_in(key, i), a.shape, jnp.float32)
            parity = jax.lax.population_count(jnp.int32(index) & trees.flat_index(a.shape, offset)) & 1
            v = sign * (1 - 2 * parity).astype(jnp.float32)
        else:
            raise ValueError(f"probe kind {kind!r}: choose rademacher or hadamard")
        out.append(v)
        offset += a.size
    return treedef.unflatten(out)


_probe = jax.jit(lambda x, key, index, kind, constrain: constrain(probe(x, key, index, kind)),
                 static_argnames=("kind", "constrain"))
_vdot = jax.jit(tree_vdot)
_scale = jax.jit(lambda v, c: jax.tree.map(lambda a: a * c, v))


# --------------------------------------------------------------------------------------------------------
# Lanczos
# --------------------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("iters", "constrain"))
def _lanczos_start(q0, iters: int, constrain: Constrain):
    """The basis [iters + 1, ...] per leaf: q0 in row 0, zeros elsewhere."""
    return constrain(jax.tree.map(lambda a: jnp.zeros((iters + 1, *a.shape), jnp.float32).at[0].set(a), q0),
                     stacked=True)


@functools.partial(jax.jit, static_argnames=("constrain",), donate_argnames=("basis",))
def _lanczos_update(basis, hq, j, beta_prev, constrain: Constrain):
    """w = H q_j - alpha q_j - beta_{j-1} q_{j-1}, reorthogonalised against q_0..q_j (rows past j are still
    zero, so they drop out); returns (q_{j+1} = w / |w|, the basis with it in row j + 1, alpha_j, beta_j)."""
    q = jax.tree.map(lambda b: b[j], basis)
    q_prev = jax.tree.map(lambda b: jnp.where(j > 0, b[jnp.maximum(j - 1, 0)], 0.0), basis)
    alpha = tree_vdot(q, hq)
    w = jax.tree.map(lambda a, b, c: a - alpha * b - beta_prev * c, hq, q, q_prev)
    for _ in range(2):  # twice is enough (Kahan, Parlett): the basis stays orthogonal to working precision
        coef = sum(jnp.tensordot(b, a, axes=a.ndim) for b, a in zip(jax.tree.leaves(basis), jax.tree.leaves(w)))
        w = jax.tree.map(lambda a, b: a - jnp.tensordot(coef, b, axes=1), w, basis)
    beta = jnp.sqrt(tree_vdot(w, w))
    q_next = constrain(jax.tree.map(lambda a: a * jnp.where(beta > 0, 1.0 / beta, 0.0), w))
    basis = jax.tree.map(lambda b, a: b.at[j + 1].set(a), basis, q_next)
    return q_next, constrain(basis, stacked=True), alpha, beta


def lanczos(matvec: MatVec, x: Tree, *, iters: int, key: jax.Array, eigs: int = 3,
            constrain: Constrain = _identity, progress: bool = False, breakdown: float = 1e-5) -> dict:
    """The `eigs` largest eigenvalues of H from `iters` Lanczos steps from a random start (a Rademacher vector
    from `key`, normalised); x gives the vectors' structure. `constrain` (hashable) lays vectors out like x.

    Returns {"top_eigenvalues": up to `eigs`, descending, "residuals" (|theta - lambda| <= residual for some
    eigenvalue lambda of H), "min_eigenvalue" (the smallest Ritz value: the most negative curvature found),
    "iters" (steps run: fewer than asked when the Krylov space is exhausted, beta < breakdown * |T|; the Ritz
    values are then exact)}. One start vector sees each distinct eigenvalue once: a repeated one is listed once.
    """
    dim = sum(a.size for a in jax.tree.leaves(x))
    iters = min(iters, dim)
    if iters < 1 or eigs < 1:
        raise ValueError(f"lanczos needs iters >= 1 and eigs >= 1, got {iters} and {eigs}")
    q = _scale(_probe(x, key, jnp.int32(0), "rademacher", constrain), 1.0 / np.sqrt(dim))  # a random unit vector
    basis = _lanczos_start(q, iters, constrain)
    alphas, betas, beta = [], [], jnp.zeros((), jnp.float32)
    with progress_bar(iters, "lanczos", progress) as bar:
        for j in range(iters):
            q, basis, alpha, beta = _lanczos_update(basis, matvec(q), jnp.int32(j), beta, constrain)
            alphas.append(float(alpha))
            betas.append(float(beta))
            bar.update()
            if betas[-1] < breakdown * max(max(abs(a) for a in alphas), max(betas[:-1], default=0.0)):
                break  # an invariant subspace: T's eigenvalues are exact eigenvalues of H
    del basis, q
    m = len(alphas)
    tridiagonal = np.diag(np.asarray(alphas)) + np.diag(betas[:m - 1], 1) + np.diag(betas[:m - 1], -1)
    theta, s = np.linalg.eigh(tridiagonal)
    order = np.argsort(theta)[::-1][:eigs]
    return {"top_eigenvalues": [float(theta[i]) for i in order],
            "residuals": [float(abs(betas[-1] * s[-1, i])) for i in order],
            "min_eigenvalue": float(theta[0]), "iters": m}


# --------------------------------------------------------------------------------------------------------
# Hutchinson
# --------------------------------------------------------------------------------------------------------

def hutchinson(matvec: MatVec, x: Tree, *, probes: int, key: jax.Array, kind: str = "rademacher",
               constrain: Constrain = _identity, progress: bool = False) -> dict:
    """tr(H) ~ mean of v^T H v over `probes` probes (see `probe`); x gives the vectors' structure.

    Returns {"trace", "trace_stderr" (sample std / sqrt(probes); None for hadamard probes, which are not
    independent, or a single probe), "values" (each probe's v^T H v), "probes", "kind"}."""
    dim = sum(a.size for a in jax.tree.leaves(x))
    if probes < 1:
        raise ValueError(f"hutchinson needs probes >= 1, got {probes}")
    if kind == "hadamard" and dim >= 2**31:
        raise ValueError(f"hadamard probes index {dim} coordinates, beyond int32; use rademacher probes")
    values = []
    with progress_bar(probes, "hutchinson", progress) as bar:
        for p in range(probes):
            v = _probe(x, key, jnp.int32(p), kind, constrain)
            values.append(_vdot(v, matvec(v)))
            bar.update()
    values = np.asarray(jax.device_get(values), np.float64)
    stderr = float(values.std(ddof=1) / np.sqrt(probes)) if kind == "rademacher" and probes > 1 else None
    return {"trace": float(values.mean()), "trace_stderr": stderr, "values": values.tolist(), "probes": probes,
            "kind": kind}
