"""Float tolerances for results that come from different summation orders of the same math.

Exact equality is for results computed identically (same program, shapes and order). Any other comparison gets
a bound that scales with the magnitude of the compared values and the length of the reductions whose order
differs, so that it holds on every IEEE machine (another x86 CPU, vector width, thread count or BLAS moves
float32 results in their last bits) and still fails on a real bug (a wrong mask, a missing term, a sign), which
moves results by orders of magnitude more. u = FP32_EPS = 2**-24 is float32's unit roundoff.

Two error models:
- Worst case (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., 2002, section 4.2): any order of
  summing n terms errs by at most gamma_{n-1} * sum|x_i|, gamma_k = k u / (1 - k u); two orders of one sum
  differ by at most twice that (`sum_bound`). Rigorous; for sums whose sum of |terms| the test knows.
- Statistical (Higham and Mary, "A new approach to probabilistic rounding error analysis", SIAM J. Sci.
  Comput. 41(5), 2019): rounding errors behave as independent zero-mean variables, so the error over n
  roundings grows as sqrt(n) u times the magnitude, not n u (`rounding_bound`). For whole forward and backward
  passes, where the sums of |terms| of the inner reductions are unknown: n is the total length of the
  reductions along the path (`forward_length`, `step_length`), scale the magnitude of the compared values
  (which stands in for the sums of |terms|: the models here are tiny and random, with layer gains of order
  one), and SAFETY the factor over the model. Measured on every call site, also with XLA limited to AVX2 or
  SSE4.2 and torch/MKL to AVX2 or no SIMD (other vector widths, so other orders): the error is at most
  0.22 sqrt(n) u scale for logits, losses and gradients, and 1.06 for values trained through Adam (`adam_bounds`),
  so SAFETY = 10 leaves a margin of 9 or more; the deliberate bugs tried (another batch, a dropped
  micro-batch, one flipped mask entry, 1% on one row's loss weights or on one weight matrix, a wrong
  rms_norm_eps) exceed the bounds 5 to 10^5 times.

Set MFT_JAX_TOLERANCE_LOG=FILE to append each checked site's largest error / bound ratio to FILE (JSON lines),
to see how close to its bound every site runs on a new machine.
"""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np
import optax

FP32_EPS = 2.0 ** -24  # unit roundoff of float32: half the spacing of the floats in [1, 2)
BF16_EPS = 2.0 ** -8  # unit roundoff of bfloat16 (8 significand bits)
SAFETY = 10.0  # factor over the statistical model (see the module docstring)


def gamma(n: int, eps: float = FP32_EPS) -> float:
    """Higham's gamma_n = n u / (1 - n u): the relative error bound of n successive roundings."""
    return n * eps / (1 - n * eps)


def sum_bound(n: int, abs_sum, eps: float = FP32_EPS):
    """Worst case |a - b| for one sum of n terms evaluated in two orders: 2 gamma_{n-1} sum|terms| (any order,
    tree or vector width: each result is within gamma_{n-1} sum|terms| of the exact sum)."""
    return 2 * gamma(max(n - 1, 0), eps) * abs_sum


def rounding_bound(n: int, scale, eps: float = FP32_EPS, safety: float = SAFETY):
    """Statistical bound on |a - b| for two evaluations, in different orders, of a computation with n roundings
    along its path and results of magnitude `scale`: safety * sqrt(n) * u * scale."""
    return safety * math.sqrt(n) * eps * scale


def forward_length(cfg, seq_len: int) -> int:
    """Total length of the reductions along one Llama forward pass (the `n` of `rounding_bound` for logits):
    per layer the two RMSNorms (hidden), q/k/v (hidden), the scores (head_dim), the softmax's normaliser and
    PV (seq_len each), o_proj (heads * head_dim), gate/up (hidden) and down (intermediate); then the final norm
    and the head (hidden each)."""
    d, heads_d = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim
    layer = 2 * d + d + cfg.head_dim + 2 * seq_len + heads_d + d + cfg.intermediate_size
    return cfg.num_hidden_layers * layer + 2 * d


def step_length(cfg, seq_len: int, tokens: int) -> int:
    """Total length of the reductions behind a training step's loss and gradients: the forward pass, the
    backward pass through it (as long again), the log-softmax over the vocabulary, and the sum over the batch's
    tokens (the reduction that gradient accumulation, data sharding and loss chunking reorder)."""
    return 2 * forward_length(cfg, seq_len) + cfg.vocab_size + tokens


def mean_nll_bound(logits_bound, logit_scale, vocab: int, positions: int, loss):
    """Bound on a weighted mean of token NLLs computed from logits that differ by at most `logits_bound`: each
    NLL (log-sum-exp minus the target's logit) moves by at most twice that, plus its own log-softmax over the
    vocabulary in another order; the weighted sum over `positions` in another order adds its own."""
    return 2 * logits_bound + rounding_bound(vocab, logit_scale) + rounding_bound(positions, loss)


def adam_bounds(grad_error, nu, values, *, steps: int, lr_sum: float, b1: float, b2: float, adam_eps: float,
                eps: float = FP32_EPS):
    """Per-element bounds (first moment, second moment, trained values) on |a - b| for two runs of `steps` Adam
    steps from the same start whose gradients differ by at most `grad_error` at every step (same masks, so the
    same math each step); `nu` and `values` are one run's second moment and trained values.

    Moments: mu = sum_j c_j g_j with sum_j c_j = 1 - b1^t moves by at most (1 - b1^t) grad_error; nu = sum_j d_j
    g_j^2 with sum_j d_j = C = 1 - b2^t by at most 2 grad_error sqrt(C nu) + C grad_error^2 (Cauchy-Schwarz).
    Values: the update m^ / (sqrt(v^) + adam_eps) moves by at most (1 + sqrt(t)) grad_error / (sqrt(v^) +
    adam_eps): m^ by grad_error, sqrt(v^) too (a weighted RMS is 1-Lipschitz), and |m^| / sqrt(v^) <= sqrt(t)
    (Cauchy-Schwarz); sqrt(v^) from `nu` (exact after one step; MFT's gradients on one batch barely change from
    step to step). Two updates never differ by more than 2 sqrt(t). Each step also rounds the update and the new
    value (a few u of each). Adam needs this care: an element whose gradient is near zero still moves by about lr,
    so the noise in its gradient shows up amplified by 1 / adam_eps.
    """
    total = 1 - b2 ** steps
    nu = np.asarray(nu, np.float64)
    mu_bound = (1 - b1 ** steps) * grad_error
    nu_bound = 2 * grad_error * np.sqrt(total * nu) + total * grad_error ** 2
    rms_grad = np.sqrt(nu / total)
    per_update = np.minimum((1 + math.sqrt(steps)) * grad_error / (rms_grad + adam_eps), 2 * math.sqrt(steps))
    values_bound = lr_sum * per_update + 4 * steps * eps * (np.abs(np.asarray(values, np.float64)) + lr_sum)
    return mu_bound, nu_bound, values_bound


def adam_moments(opt_state) -> optax.ScaleByAdamState:
    """The (count, mu, nu) state of the Adam transform inside an optax optimizer state."""
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
    return next(s for s in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(s))


def assert_same_adam_training(state_a, state_b, optim, *, steps: int, lr_sum: float, n: int) -> dict:
    """Trained values and Adam moments of two training states ({"trainable", "opt_state"}) after the same `steps`
    steps (learning rates summing to `lr_sum`) with the same masks, whose reductions (`n` roundings along the
    path, see `step_length`) ran in other orders: each leaf's gradients within `rounding_bound` at the leaf's
    scale (its largest RMS gradient, from nu), then `adam_bounds`. Returns the trained values' bounds by path."""
    moments_a, moments_b = adam_moments(state_a["opt_state"]), adam_moments(state_b["opt_state"])
    flat_b = jax.tree_util.tree_flatten_with_path(state_b["trainable"])[0]
    leaves = zip(flat_b, jax.tree.leaves(state_a["trainable"]), jax.tree.leaves(moments_a.mu),
                 jax.tree.leaves(moments_b.mu), jax.tree.leaves(moments_a.nu), jax.tree.leaves(moments_b.nu))
    value_bounds = {}
    for (path, value_b), value_a, mu_a, mu_b, nu_a, nu_b in leaves:
        nu_b, name = np.asarray(nu_b), jax.tree_util.keystr(path)
        grad_error = rounding_bound(n, math.sqrt(float(nu_b.max()) / (1 - optim.b2 ** steps)))
        mu_bound, nu_bound, value_bound = adam_bounds(grad_error, nu_b, value_b, steps=steps, lr_sum=lr_sum,
                                                      b1=optim.b1, b2=optim.b2, adam_eps=optim.eps)
        assert_close(mu_a, mu_b, mu_bound, f"Adam mu {name}")
        assert_close(nu_a, nu_b, nu_bound, f"Adam nu {name}")
        assert_close(value_a, value_b, value_bound, f"trained {name}")
        value_bounds[path] = value_bound
    return value_bounds


def binomial_bound(p, n: int, sigmas: float = 5.0):
    """|frequency - p| bound for n independent draws of probability p: `sigmas` binomial standard deviations,
    sqrt(p (1 - p) / n) (5 sigma: a correct sampler fails one with probability about 6e-7)."""
    p = np.asarray(p, np.float64)
    return sigmas * np.sqrt(p * (1 - p) / n)


def assert_close(actual, expected, bound, what: str = ""):
    """|actual - expected| <= bound elementwise (bound: a scalar or an array broadcasting to them); the message
    gives the largest error and its ratio to the bound."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    bound = np.broadcast_to(np.asarray(bound, np.float64), np.broadcast_shapes(actual.shape, expected.shape))
    error = np.abs(actual - expected)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.where(error == 0, 0.0, error / bound)
    ratios = np.nan_to_num(ratios, nan=math.inf)  # NaN in either: fails
    ratio = float(np.max(ratios, initial=0.0))
    _log(what, ratio)
    where = np.unravel_index(np.argmax(ratios), ratios.shape) if ratios.size else ()
    assert np.all(error <= bound), (f"{what}: |error| {error[where]:.3g} at {where} is {ratio:.3g} x the bound "
                                    f"{bound[where]:.3g}")


def _log(what: str, ratio: float):
    path = os.environ.get("MFT_JAX_TOLERANCE_LOG")
    if path:
        test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]  # "node id (call)"
        with open(path, "a") as f:
            f.write(json.dumps({"test": test, "what": what, "ratio": ratio}) + "\n")
