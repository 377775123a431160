"""Sound upper bounds on the spectral norm ||A||_2 of linear operators, chosen by the class of ``op.structure``.

Every ``UpperBound.value`` is a proven upper bound on the norm of the exact (real-number) operator defined
by the stored weights, with float64 rounding of the computation covered by an explicit margin. Estimates
from below (power iteration, ``lipcert.bounds.power_iteration``) are never returned here.

Sources: Sedghi, Gupta, Long, "The Singular Values of Convolutional Layers", ICLR 2019 (circular
convolutions, exact by DFT); Delattre, Barthelemy, Araujo, Allauzen, "Efficient Bound of Lipschitz Constant
for Convolutional Layers by Gram Iteration", ICML 2023 (Gram iteration); the Schur test (Schur 1911; see
Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., for ||A||_2 <= sqrt(||A||_1 ||A||_inf));
Higham (ibid., ch. 3) for the rounding-error bounds quoted in the comments.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lipcert.bounds.thresholds import current, record
from lipcert.graph.linop import (
    ChainStructure,
    ConvStructure,
    DiagStructure,
    IsometryStructure,
    LinearOperator,
    MatrixStructure,
    NonnegativeStructure,
    ProjectionStructure,
    ScalarStructure,
)

# Unit roundoff of float64 (half the machine epsilon).
U64 = 2.0 ** -53

# Relative margin applied to every float64 result. The computations used (inner products and sums, Gram
# matrices, LAPACK's backward-stable Hermitian eigensolver) return the top singular value within p(n) * u
# of the exact one, relatively, where p(n) = c * n grows with the size n of the problem (Higham ch. 3 for
# inner products, gamma_n = n u / (1 - n u); LAPACK Users' Guide, "Error bounds for the symmetric
# eigenproblem"; each caller states its n). With c = ROUNDING_C = 8 and u = 2^-53 ~ 1.1e-16,
# c * n * u <= 1e-9 for n up to 1.1e6; for larger n the margin grows as c * n * u (see ``inflate``).
# Either way it is far below anything that matters for a certificate from float32 weights (precision 6e-8).
ROUNDING_MARGIN = 1e-9
ROUNDING_C = 8
#: structures whose bound is read off the structure itself (or, for a matrix, its SVD or Gram iteration), never
#: from the operator's dense matrix
STRUCTURAL = (ScalarStructure, DiagStructure, IsometryStructure, ProjectionStructure, MatrixStructure)

# The sizes that choose between the dense SVD and the structured bounds, and the chunk of dense construction and
# DFT evaluation, are ``thresholds.current()``: dense_limit, dense_max_entries, chunk_elems.

#: the branches ``upper_bound`` records (``thresholds.record``): the method of each bound, and chunked evaluation
BRANCHES = ("spectral.svd", "spectral.matrix-svd", "spectral.gram", "spectral.fft-circular", "spectral.fft-embedding",
            "spectral.schur", "spectral.product", "spectral.pad-conv", "spectral.structural", "spectral.none",
            "spectral.dense-chunked", "spectral.dft-chunked")


@dataclass
class UpperBound:
    """A proven upper bound on ||A||_2 and how it was obtained."""

    value: float  # proven upper bound on ||A||_2, float rounding included
    method: str  # svd, fft-circular, fft-embedding, gram, schur, product(...), structural, none
    exact: bool  # value equals the norm up to the rounding margin
    #: a dense decomposition's top right singular vector of the operator (flat, float64): power iteration's start
    start: torch.Tensor | None = None


def inflate(value: float, n: int) -> float:
    """``value`` raised by the rounding margin for a float64 computation of dimension ``n``, rounded up."""
    margin = max(ROUNDING_MARGIN, ROUNDING_C * n * U64)
    return math.nextafter(value * (1.0 + margin), math.inf)


def mul_up(a: float, b: float) -> float:
    """a * b rounded upwards (for products of non-negative bounds)."""
    return math.nextafter(a * b, math.inf)


def largest_singular_value(mat: torch.Tensor) -> float:
    """max over a batch of matrices of ||M||_2, from the top eigenvalue of the smaller Gram matrix M M^H.

    Much faster than a full SVD for wide or batched complex matrices. Rounding: fl(M M^H) = M M^H + E with
    ||E||_2 <= gamma_k ||M||_F^2 <= r gamma_k ||M||_2^2 (k the long side, r the short one), and eigvalsh is
    backward stable, so sigma_max^2 has relative error O(k r u): callers inflate with n = k * r.
    """
    if mat.numel() == 0:
        return 0.0
    if mat.shape[-2] > mat.shape[-1]:
        mat = mat.mH
    top = torch.linalg.eigvalsh(mat @ mat.mH)[..., -1].max()
    return math.sqrt(max(float(top), 0.0))


def top_singular(mat: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
    """||M||_2 with a top left and right singular vector of one 2-D matrix, from one eigendecomposition of the
    smaller Gram matrix (the one ``largest_singular_value`` takes), the other vector by one product: no SVD."""
    wide = mat.shape[0] < mat.shape[1]
    values, vectors = torch.linalg.eigh(mat @ mat.mH if wide else mat.mH @ mat)
    sigma = math.sqrt(max(float(values[-1]), 0.0))
    found = vectors[:, -1]
    other = mat.mH @ found if wide else mat @ found
    other = other / other.norm() if float(other.norm()) > 0 else other
    return (sigma, found, other) if wide else (sigma, other, found)


def ungrouped_kernel(w: torch.Tensor, groups: int, c_in: int) -> torch.Tensor | None:
    """A grouped convolution's kernel (c_out, c_in / groups, *k) as the block-diagonal kernel (c_out, c_in, *k) of
    the same map; None when the shapes do not divide into ``groups``."""
    c_out, c_in_g = w.shape[:2]
    if groups < 1 or c_out % groups or c_in_g * groups != c_in:
        return None
    if groups == 1:
        return w
    full = w.new_zeros((c_out, c_in) + tuple(w.shape[2:]))
    per = c_out // groups
    for g in range(groups):
        full[g * per:(g + 1) * per, g * c_in_g:(g + 1) * c_in_g] = w[g * per:(g + 1) * per]
    return full


# ----------------------------------------------------------------------------------------------- dense


def _dense_ok(op: LinearOperator, dense_limit: int) -> bool:
    """Whether the explicit matrix is small enough for an exact dense SVD."""
    m, n = op.out_numel, op.in_numel
    return min(m, n) <= dense_limit and m * n <= current().dense_max_entries


def _dense_norm(op: LinearOperator, device: str | torch.device) -> tuple[float, torch.Tensor]:
    """||A||_2 by a float64 eigendecomposition of the Gram matrix of the explicit matrix, built from the smaller
    side (A or A^T) in chunks, with a top right singular vector of A (power iteration's start)."""
    side = op
    if op.out_numel < op.in_numel:  # fewer adjoint calls; ||A^T|| = ||A||
        side = LinearOperator(in_shape=op.out_shape, out_shape=op.in_shape, forward=op.adjoint,
                              adjoint=op.forward)
    chunk = max(1, min(1024, current().chunk_elems // max(op.in_numel, op.out_numel)))
    if chunk < side.in_numel:
        record("spectral.dense-chunked")
    with torch.no_grad():
        mat = side.to_dense(dtype=torch.float64, device=device, chunk=chunk)
    if mat.numel() == 0:
        return 0.0, torch.zeros(op.in_numel, dtype=torch.float64)
    sigma, left, right = top_singular(mat)
    return sigma, (right if side is op else left).cpu()


def _svd_bound(op: LinearOperator, device: str | torch.device) -> UpperBound:
    """Exact dense SVD of the operator, inflated by the rounding margin.

    The explicit matrix is computed by the operator itself in float64: for one layer each entry is a single
    weight (exact); for a chain each entry carries O(depth * fan-in * u) relative rounding, which the margin
    (at least 1e-9, i.e. ~10^7 u) is meant to absorb.
    """
    record("spectral.svd")
    sigma, start = _dense_norm(op, device)
    return UpperBound(inflate(sigma, op.in_numel * op.out_numel), "svd", True, start)


# ------------------------------------------------------------------------------------------ matrices


def kernel_matrix_norm(weight: torch.Tensor) -> float:
    """||weight.reshape(c_out, -1)||_2, what torch's spectral_norm normalises: for contrast, never a bound."""
    w = weight.detach().to(torch.float64)
    return largest_singular_value(w.reshape(w.shape[0], -1))


def gram_norm_bound(matrix: torch.Tensor, iters: int = 6) -> float:
    """Upper bound on ||M||_2 by Gram iteration (Delattre et al., ICML 2023), rescaled so it cannot overflow.

    G_0 = M, G_{t+1} = G_t^T G_t gives ||M||_2 = ||G_t||_2^(1/2^t) <= ||G_t||_F^(1/2^t). Each G_t is kept
    as exp(s_t) * H_t with ||H_t||_F = 1 before squaring, so only the log-scale s_t grows. Rounding (M is
    m x n, m >= n): with H normalised, fl(H^T H) = H^T H + E with ||E||_2 <= ||E||_F <= gamma_m and
    ||H^T H||_2 = ||H||_2^2 >= 1/n, so each step has relative error delta <= n gamma_m ~ m n u, i.e.
    ||G_t||_2^2 <= (1 + delta) ||G_{t+1}||_2; taking the 2^-t-th roots, these factors multiply to less than
    (1 + delta), which ``inflate(., m * n)`` covers (the log-scale bookkeeping adds O(iters u |log value|)).
    """
    g = matrix.detach().to(torch.float64)
    if g.shape[0] < g.shape[1]:  # iterate on the smaller Gram matrix; ||M^T|| = ||M||
        g = g.T
    if g.numel() == 0:
        return 0.0
    log_scale = 0.0  # G_t = exp(log_scale) * g
    for _ in range(iters):
        f = float(torch.linalg.matrix_norm(g, ord="fro"))
        if f == 0.0:
            return 0.0
        g = g / f
        log_scale = 2.0 * (log_scale + math.log(f))
        g = g.T @ g
    f = float(torch.linalg.matrix_norm(g, ord="fro"))
    if f == 0.0:
        return 0.0
    value = math.exp((log_scale + math.log(f)) / 2.0 ** iters)
    return inflate(value, matrix.numel())


def matrix_upper_bound(m: torch.Tensor) -> float:
    """A proven upper bound on ||M||_2 for a dense matrix (exact SVD when small, else Gram iteration)."""
    return _matrix_bound(m, current().dense_limit, "cpu").value


def conv_upper_bound(op: LinearOperator) -> float:
    """A proven upper bound on the norm of the convolution ``op.structure`` describes, by the DFT (never a
    dense SVD of ``op``'s own forward, so the structure may carry another weight); inf if not handled."""
    bound = _conv_bound(op, "cpu")
    return math.inf if bound is None else bound.value


def _matrix_bound(m: torch.Tensor, dense_limit: int, device: str | torch.device) -> UpperBound:
    """||M||_2 for an operator applying M along the last axis: exact SVD when small, else Gram iteration."""
    m = m.detach().to(device=device, dtype=torch.float64)
    if min(m.shape) <= dense_limit:
        record("spectral.matrix-svd")
        return UpperBound(inflate(largest_singular_value(m), m.numel()), "svd", True)
    record("spectral.gram")
    return UpperBound(gram_norm_bound(m), "gram", False)


# ------------------------------------------------------------------------------------- convolutions


def _circular_norm(weight: torch.Tensor, grid: Sequence[int], dilation: Sequence[int], groups: int,
                   device: str | torch.device) -> float:
    """Largest singular value over all DFT frequencies of a stride-1 circular conv on ``grid``.

    The conv computes y[:, r] = sum_t K[:, :, t] x[:, (r + dilation * t) mod grid] (cross-correlation), which
    the DFT block-diagonalises into the c_out x c_in matrices
    K_hat(w) = sum_t K[:, :, t] exp(2 pi i <w, d t> / grid) (Sedghi et al. 2019; the sign convention does not
    matter, as w ranges over all frequencies). Since the
    kernel is real, K_hat(-w) = conj(K_hat(w)) has the same singular values, so only half the frequencies of
    the last axis are evaluated. With groups, K_hat(w) is block diagonal and its norm is the max over blocks.
    K_hat is evaluated by direct summation over the taps, in chunks of frequencies, to bound memory.
    """
    w = weight.detach().to(device=device, dtype=torch.float64)
    nd = w.dim() - 2
    grid = tuple(int(g) for g in grid)
    dil = tuple(int(d) for d in dilation)
    if len(grid) != nd or len(dil) != nd:
        raise ValueError(f"{nd}-D kernel needs {nd} grid sizes and dilations, got {grid} and {dil}")
    c_out, c_in_g = w.shape[:2]
    if c_out % groups:
        raise ValueError(f"c_out={c_out} is not divisible by groups={groups}")
    taps = math.prod(w.shape[2:])
    kw = w.reshape(groups, c_out // groups, c_in_g, taps).to(torch.complex128)
    axes = [torch.arange(k, device=device) * d for k, d in zip(w.shape[2:], dil, strict=False)]
    pos = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(taps, nd)
    half = grid[:-1] + (grid[-1] // 2 + 1,)
    n_freq = math.prod(half)
    chunk = max(1, current().chunk_elems // (kw.numel() // taps + taps))
    if chunk < n_freq:
        record("spectral.dft-chunked")
    best = 0.0
    for start in range(0, n_freq, chunk):
        idx = torch.unravel_index(torch.arange(start, min(n_freq, start + chunk), device=device), half)
        angle = torch.zeros(idx[0].shape[0], taps, dtype=torch.float64, device=device)
        for axis in range(nd):
            # (u * p) mod G in exact integer arithmetic keeps the angle in [0, 2 pi).
            prod = (idx[axis][:, None] * pos[None, :, axis]) % grid[axis]
            angle += prod.to(torch.float64) * (2.0 * math.pi / grid[axis])
        phase = torch.polar(torch.ones_like(angle), angle)
        best = max(best, largest_singular_value(torch.einsum("ft,goit->fgoi", phase, kw)))
    return best


def _circular_upper(kernel: torch.Tensor, grid: Sequence[int], groups: int,
                    device: str | torch.device) -> float:
    """Proven upper bound on the norm of the stride-1, undilated circular conv with ``kernel`` on ``grid``.

    Each computed K_hat entry has an absolute error <= gamma_{T+4} sum_t |K_t| (T taps, 4 roundings for the
    phase), so ||E(w)||_2 <= ||E(w)||_F <= gamma_{T+4} sqrt(T) ||K||_F, added in full; the per-frequency
    eigenvalue solve is then covered by ``inflate`` with n = (c_out/groups) * (c_in/groups).
    """
    taps = math.prod(kernel.shape[2:])
    err = ROUNDING_C * (taps + 4) * U64 * math.sqrt(taps) * float(torch.linalg.vector_norm(kernel))
    value = _circular_norm(kernel, grid, (1,) * (kernel.dim() - 2), groups, device)
    return inflate(value + err, kernel.shape[0] // groups * kernel.shape[1])


def conv_circular_norm(weight: torch.Tensor, input_hw: Sequence[int], *,
                       dilation: Sequence[int] | None = None, groups: int = 1) -> float:
    """Exact norm of the stride-1 circular conv on an ``input_hw`` grid (Sedghi et al. 2019)."""
    return _circular_norm(weight, input_hw, dilation or (1,) * (weight.dim() - 2), groups, "cpu")


def _polyphase_kernel(weight: torch.Tensor, factor: Sequence[int], dilation: Sequence[int]) -> torch.Tensor:
    """Rewrite a strided, dilated kernel as a stride-1, undilated one over ``prod(factor)`` input phases.

    Per axis, output o reads input position f*o + d*t for tap t (f = factor, d = dilation). Writing
    d*t = f*a_t + r_t with 0 <= r_t < f, it reads phase r_t (the inputs at positions = r_t mod f) at phase
    position o + a_t. So K'[:, c * R + r, a] = K[:, c, t] (R = prod(factor), r raveled over axes) is the
    kernel of the equivalent stride-1 convolution over the phases; t -> (r, a) is injective, so K' holds
    exactly the entries of K (same Frobenius norm).
    """
    c_out, c_in_g, *ks = weight.shape
    per_axis = [[divmod(d * t, f) for t in range(k)] for k, f, d in zip(ks, factor, dilation, strict=False)]
    lengths = [axis[-1][0] + 1 for axis in per_axis]
    out = weight.new_zeros(c_out, c_in_g, *factor, *lengths)
    for t in itertools.product(*[range(k) for k in ks]):
        a_r = [per_axis[i][ti] for i, ti in enumerate(t)]
        index: tuple[slice | int, ...] = (slice(None), slice(None), *[r for _, r in a_r], *[a for a, _ in a_r])
        taps: tuple[slice | int, ...] = (slice(None), slice(None), *t)
        out[index] = weight[taps]
    return out.reshape(c_out, c_in_g * math.prod(factor), *lengths)


def _conv_shapes_match(op: LinearOperator, w: torch.Tensor, n: tuple[int, ...], outputs: tuple[int, ...],
                       groups: int, transpose: bool) -> bool:
    """Whether the convolution the structure states maps exactly the shapes it describes (its ``core``, else the
    operator's): (c_in, *input_spatial) to (c_out, *outputs); for a transposed one, the output's channels and rank
    (its extra positions are zero rows or crops). A kernel read against other shapes bounds another map."""
    c_in, c_out = op.structure.core or (tuple(op.in_shape), tuple(op.out_shape))
    channels_in, channels_out = (w.shape[0], w.shape[1] * groups) if transpose else (w.shape[1] * groups, w.shape[0])
    if groups < 1 or w.shape[0] % groups or tuple(c_in) != (channels_in, *n) or len(c_out) != len(n) + 1:
        return False
    return c_out[0] == channels_out and (transpose or tuple(c_out[1:]) == outputs)


def _conv_bound(op: LinearOperator, device: str | torch.device) -> UpperBound | None:
    """DFT bound for an operator with a ``ConvStructure``, or None if it is outside what is handled.

    Per axis (n = input_spatial, s = stride, d = dilation, (b, e) = pads, k_eff = d*(k-1) + 1), the strided
    conv is rewritten by ``_polyphase_kernel`` as a stride-1 conv over the s phases of its input (the notes'
    "polyphase channels"), whose norm is then taken on a circular grid by DFT:

    * zero padding: with M outputs, the conv reads padded positions [0, L), L = s*(M-1) + k_eff <= n + b + e.
      Dropping the unread positions and splitting the rest into s phases of length Q = ceil(L/s) placed on a
      circular grid of size G = max(Q, A) (A the polyphase kernel length) maps the input by a contraction.
      Output o reads phase positions o + a_t <= (L - 1) // s = Q - 1 < G: no wrap-around, so the conv equals
      a submatrix of the circular conv on G after that contraction, and ||A|| <= ||C_G|| ("fft-embedding").
    * transposed conv (zero padding): ONNX ConvTranspose is the adjoint of the conv with the same weight
      tensor (read as [c_out, c_in/groups, k...]), stride, dilation and pads, whose M outputs are the n inputs
      of the transposed conv (output_padding only adds positions that conv never reads); ||A^T|| = ||A||, so
      it is bounded as above with M = n.
    * circular (``pads`` = the circular padding before a valid conv): output o reads x[(s*o + d*t - b) mod n],
      i.e. x'[(s*o + d*t) mod n] for the circular shift x' of x (an isometry). If s divides n the phases
      x'[(s*q + r) mod n] are a permutation of x', and output o is row o mod (n/s) of the stride-1 circular
      conv on the n/s grid; if not, phase factor 1 is used and output o is row (s*o) mod n of the circular
      conv on the n grid. With each row used at most m times (m = product of the per-axis maxima), A = R C
      with R^T R <= m I, so ||A|| <= sqrt(m) ||C||; when every row is used exactly once, A is C with permuted
      rows and the value is exact ("fft-circular").
    """
    s = op.structure
    if not isinstance(s, ConvStructure):
        return None
    w = s.weight.detach().to(torch.float64)
    nd = w.dim() - 2
    n = tuple(int(v) for v in s.input_spatial)
    stride = tuple(int(v) for v in s.stride)
    dil = tuple(int(v) for v in s.dilation)
    pads = tuple(int(v) for v in s.pads)
    groups = int(s.groups)
    circular, transpose = bool(s.circular), bool(s.transpose)
    if (circular and transpose) or len(pads) != 2 * nd or min(pads, default=0) < 0 \
            or any(len(t) != nd for t in (n, stride, dil)):
        return None
    k_eff = tuple(d * (k - 1) + 1 for d, k in zip(dil, w.shape[2:], strict=False))
    outputs = n if transpose else tuple((ni + b + e - ke) // si + 1
                                        for ni, b, e, ke, si in zip(n, pads[:nd], pads[nd:], k_eff, stride,
                                                                    strict=False))
    if min(outputs) < 1 or not _conv_shapes_match(op, w, n, outputs, groups, transpose):
        return None
    if not circular:
        kernel = _polyphase_kernel(w, stride, dil)
        reach = tuple(si * (mi - 1) + ke for si, mi, ke in zip(stride, outputs, k_eff, strict=False))
        grid = tuple(max(-(-li // si), a) for li, si, a in zip(reach, stride, kernel.shape[2:], strict=False))
        record("spectral.fft-embedding")
        return UpperBound(_circular_upper(kernel, grid, groups, device), "fft-embedding", False)
    factor = tuple(si if ni % si == 0 else 1 for ni, si in zip(n, stride, strict=False))
    mult, exact = 1, True
    for ni, mi, si, f in zip(n, outputs, stride, factor, strict=False):
        rows = Counter((si // f * o) % (ni // f) for o in range(mi))
        mult *= max(rows.values())
        exact = exact and len(rows) == ni // f and max(rows.values()) == 1
    kernel = _polyphase_kernel(w, factor, dil)
    value = _circular_upper(kernel, tuple(ni // f for ni, f in zip(n, factor, strict=False)), groups, device)
    record("spectral.fft-circular")
    return UpperBound(mul_up(value, math.sqrt(mult)), "fft-circular", exact)


# ------------------------------------------------------------------------------------- pad + conv


def _tap_counts(n: int, outputs: int, k: int, stride: int, dilation: int, begin: int) -> list[int]:
    """Per input position q of one axis, how many (output o, tap t) pairs read it: s o + d t - begin = q."""
    counts = [0] * n
    for o in range(outputs):
        for t in range(k):
            q = stride * o + dilation * t - begin
            if 0 <= q < n:
                counts[q] += 1
    return counts


def padded_conv_bound(absolute: LinearOperator, conv: LinearOperator) -> float | None:
    """A proven bound on ||C P|| for a convolution C read after a linear map P, from |P| (``absolute``: a map with
    |P| entrywise, or P itself when it is non-negative) alone; None when C is not a plain convolution of
    ``absolute``'s output.

    The tap-count argument, with the pad: (C z)_o = W_mat patch_o(z) per group, so
    ||C z||^2 <= max_g ||W_g||^2 sum_o ||patch_o(z)||^2 = max_g ||W_g||^2 sum_q tau_q ||z_q||^2, tau_q the number of
    (output, tap) pairs that read input position q (zero padding reads nothing). With z = P x, |z| <= |P| |x|, so
    ||C P||^2 <= max_g ||W_g||^2 ||D^(1/2) |P| ||^2 <= max_g ||W_g||^2 max(|P|^T D |P| 1) (D = diag(tau); the
    Schur test on the non-negative symmetric |P|^T D |P|). For a pad that copies entries, |P|^T D |P| is diagonal
    and max(|P|^T D |P| 1) is the most (output, tap) pairs that read one input entry, through its copies: the
    library's "each entry is read k x k times", made exact at the borders. Assumes (checked): C is a forward,
    zero-padded convolution whose structure describes exactly the shapes it maps (its input is ``absolute``'s
    output)."""
    s = conv.structure
    if not isinstance(s, ConvStructure) or s.transpose or s.circular or s.loose_in or s.inexact:
        return None
    w = s.weight.detach().to(torch.float64)
    nd = w.dim() - 2
    n = tuple(int(v) for v in s.input_spatial)
    pads = tuple(int(v) for v in s.pads)
    if len(pads) != 2 * nd or min(pads, default=0) < 0 or len(n) != nd:
        return None
    k_eff = tuple(d * (k - 1) + 1 for d, k in zip(s.dilation, w.shape[2:], strict=False))
    outputs = tuple((ni + b + e - ke) // si + 1 for ni, b, e, ke, si in zip(n, pads[:nd], pads[nd:], k_eff, s.stride,
                                                                          strict=False))
    groups = int(s.groups)
    if min(outputs) < 1 or not _conv_shapes_match(conv, w, n, outputs, groups, False) \
            or tuple((s.core or (conv.in_shape, conv.out_shape))[0]) != tuple(absolute.out_shape):
        return None
    tau = torch.ones((), dtype=torch.float64)
    for i in range(nd):
        counts = torch.tensor(_tap_counts(n[i], outputs[i], w.shape[2 + i], int(s.stride[i]), int(s.dilation[i]),
                                          pads[i]), dtype=torch.float64)
        tau = tau[..., None] * counts
    with torch.no_grad():
        reach = absolute.forward(torch.ones((1,) + tuple(absolute.in_shape), dtype=torch.float64))
        read = absolute.adjoint(reach * tau)
    # sums of non-negative terms (relative error gamma_n each, n the entries summed), covered by the margin
    most = max(float(read.max()), 0.0) if read.numel() else 0.0
    c_out, c_in_g = w.shape[:2]
    kernel = w.reshape(groups, c_out // groups, c_in_g * math.prod(w.shape[2:]))
    value = math.sqrt(most) * largest_singular_value(kernel)
    return inflate(value, absolute.in_numel + absolute.out_numel + kernel.shape[1] * kernel.shape[2])


# ---------------------------------------------------------------------------------------- dispatcher


def _schur_bound(op: LinearOperator, device: str | torch.device) -> UpperBound:
    """Schur test for an operator with non-negative entries: ||A|| <= sqrt(max(A 1) * max(A^T 1))."""
    with torch.no_grad():
        rows = op.forward(torch.ones(1, *op.in_shape, dtype=torch.float64, device=device))
        cols = op.adjoint(torch.ones(1, *op.out_shape, dtype=torch.float64, device=device))
    # Sums of non-negative terms: relative error <= gamma_n, covered by the margin with n = in + out.
    value = math.sqrt(max(float(rows.max()), 0.0) * max(float(cols.max()), 0.0))
    record("spectral.schur")
    return UpperBound(inflate(value, op.in_numel + op.out_numel), "schur", False)


def _product_bound(parts: Sequence[LinearOperator], device: str | torch.device,
                   dense_limit: int) -> UpperBound:
    """||A_k ... A_1|| <= prod ||A_i||, each factor bounded on its own, the product rounded upwards."""
    record("spectral.product")
    bounds = [upper_bound(p, device=device, dense_limit=dense_limit) for p in parts]
    i = 0
    while i < len(bounds) - 1:  # a non-negative map (a pad) and the convolution reading it, bounded as one
        pad, conv = parts[i], parts[i + 1]
        whole = padded_conv_bound(pad, conv) if isinstance(pad.structure, NonnegativeStructure) \
            and not pad.structure.loose_out else None
        if whole is not None and whole < mul_up(bounds[i].value, bounds[i + 1].value):
            record("spectral.pad-conv")
            bounds[i:i + 2] = [UpperBound(whole, "pad-conv", False)]
            parts = [*parts[:i], conv, *parts[i + 2:]]  # keeps ``parts`` aligned with ``bounds``
        i += 1
    value = 1.0
    for b in bounds:
        value = mul_up(value, b.value)
    return UpperBound(value, f"product({','.join(b.method for b in bounds)})", False)


def upper_bound(op: LinearOperator, *, device: str | torch.device = "cpu",
                dense_limit: int | None = None) -> UpperBound:
    """A proven upper bound on ||op||_2, by the tightest method available for its structure.

    Methods: scalar |c| and diag max|scale| (exact); isometry 1 (exact) and projection 1 (a bound), both
    "structural"; matrix: SVD of M, or Gram iteration when min(M.shape) > dense_limit; any other operator
    whose explicit matrix is small (min(in, out) <= dense_limit and in * out <= dense_max_entries) gets an exact
    dense SVD; otherwise conv: DFT ("fft-circular" / "fft-embedding"), nonnegative: Schur test, chain: product
    of the parts' bounds, anything else: inf ("none"). ``dense_limit`` None: ``thresholds.current()``'s.
    """
    if dense_limit is None:
        dense_limit = current().dense_limit
    if not isinstance(op.structure, STRUCTURAL) and _dense_ok(op, dense_limit):
        return _svd_bound(op, device)  # the operator itself, whatever its structure says
    bound = _dispatch(op, device, dense_limit)
    if bound.exact and op.structure.inexact:  # the structure describes a map of equal or larger norm
        return UpperBound(bound.value, bound.method, False)
    return bound


def _dispatch(op: LinearOperator, device: str | torch.device, dense_limit: int) -> UpperBound:
    """The bound of ``upper_bound`` by the method for the operator's structure, before exactness is settled."""
    # scalars and scales may be float64 products of merged factors: one rounding, covered by one ulp up
    match op.structure:
        case ScalarStructure(value=value):
            record("spectral.structural")
            return UpperBound(math.nextafter(abs(float(value)), math.inf), "structural", True)
        case DiagStructure(scale=scale):
            record("spectral.structural")
            scale = torch.as_tensor(scale).detach()
            largest = float(scale.abs().max()) if scale.numel() else 0.0
            return UpperBound(math.nextafter(largest, math.inf), "structural", True)
        case IsometryStructure():
            record("spectral.structural")
            return UpperBound(1.0, "structural", True)
        case ProjectionStructure():
            record("spectral.structural")
            return UpperBound(1.0, "structural", False)
        case MatrixStructure(matrix=matrix):
            return _matrix_bound(matrix, dense_limit, device)
        case ConvStructure():
            bound = _conv_bound(op, device)
            if bound is not None:
                return bound
        case NonnegativeStructure():
            return _schur_bound(op, device)
        case ChainStructure(parts=parts):
            return _product_bound(parts, device, dense_limit)
    record("spectral.none")
    return UpperBound(math.inf, "none", False)
