"""Local certificates: radii larger than the global rule's, from what the network does near each point.

The network is cut as body -> tail. The body (everything before the tail's first linear step, output h) is
L_body-Lipschitz by lipcert's sound bound, so it maps the ball B(x, r) into the feature ball B(h(x), L_body r).
The tail is a chain ``linear, activation, ..., linear, activation, linear head`` whose activations are
piecewise linear with known switching functionals s (ReLU, Abs, LeakyReLU, (Relu(x), Relu(-x)): one entry;
GroupSort / MaxMin: the difference of two entries of a group): where no s changes sign, the activation is one
linear map, and every activation is J0 p + G relu(S p) (checked in code on two points of mixed signs).

- ``linear`` (exact local linearity): when every switching functional keeps its strict sign on the feature
  ball (|s(p(x))| > rho ||s A||, A the tail's map from h to that activation's input, composed through the
  stable activations before it), the tail is affine on the ball and each margin z_y - z_j has the local
  Lipschitz constant L_body ||c_j||, c_j the composed row difference. Closed form: the smallest of the
  stability radii and the margins' radii.
- ``lipschitz`` (the margin's own Lipschitz bound over the ball): a switch whose interval over the ball keeps
  its sign is fixed, one that may switch is left free (its Jacobian entry anywhere in [0, 1]); every gradient
  of the margin on the ball lies in a zonotope, whose largest norm is bounded (``_Bounds.gain``), and the
  margin drops by at most rho times that. Switch intervals: exact for the first activation (s(p(x)) +- rho
  ||s A||), by the same bound for later ones. Radius by bisection.
- ``crown`` (bound propagation over the L2 ball): each relu(s) gets CROWN's linear lower or upper relaxation on
  its interval, which gives a linear lower bound of each margin minimised over the ball with the dual (L2)
  norm; intermediate intervals by the same backward pass. Radius by bisection.

Float32 soundness: the deployed logits at any x' with ||x' - x|| <= r differ from the exact ones by at most
E(r) = base + slope r, the global certificate's allowance (``Engine.error``). A radius r is certified when the
exact margin's lower bound over the ball exceeds sqrt(2) E(r) for every other class. The analysis itself runs
in float64: the values at x (pre-activations, logits) carry the float64 error bound of lipcert's own rounding
analysis compiled for float64 (``rounding.plan``), every pulled-back row carries a Higham bound on its rounding,
and the result is never below the global radius. Any tail this module cannot prove anything about leaves the
global radius, with the reason.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lipcert.bounds.kinds import Linear, Pattern, Rule
from lipcert.bounds.propagate import Propagation, propagate
from lipcert.bounds.rounding import ErrorPlan, gamma, nonnegative_norm
from lipcert.bounds.rounding import plan as error_plan
from lipcert.bounds.steps import Step
from lipcert.certification.radii import SQRT2, CertificateSetup, sample_norms
from lipcert.graph.core import Graph, Node
from lipcert.graph.executor import GraphModule
from lipcert.graph.ops import REGISTRY, RunContext

METHODS = ("linear", "lipschitz", "crown", "best")
#: float64 unit roundoff of the analysis
U64 = 2.0 ** -53
#: the most entries (samples x rows x feature entries) one pull-back holds at once
MAX_ROW_ENTRIES = 2 ** 25
#: bisection steps of the searched radii (``lipschitz``, ``crown``)
BISECTION_STEPS = 12
#: with requested radii, each is tested this much above itself (a report counts radius > eps as certified)
AT_MARGIN = 1e-9
#: the searched methods skip a sample whose own pattern's radius (times this, for rounding) is below every radius
#: left to prove: a screen, never a certificate
SCREEN_SLACK = 1 + 1e-6
#: relative slack on float64 norms and sums of the analysis (far above their rounding, far below any margin)
SLACK = 1e-9
#: the most switching functionals one tail activation may have: each costs a pull-back of the margin rows through
#: the tail, so wider blocks (a convolution's feature map) leave the global radius, with the reason
MAX_SWITCHES = 1024


@dataclass
class Activation:
    """A piecewise-linear tail step: its switching functionals s = v[first] - v[second] (second -1: v[first])
    over the flat entries of its input v."""

    step: Step
    first: torch.Tensor
    second: torch.Tensor
    nodes: list[Node]


@dataclass
class Tail:
    """A tail of ``depth`` activations: linear steps ``linears[k]`` then ``activations[k]``, then ``head``."""

    start: str  # the body's output h
    body_lipschitz: float  # L_body in the user's input space
    linears: list[Step]
    activations: list[Activation]
    head: Step
    sizes: dict[str, float]  # || |A| || of each linear step, by its output (its float64 adjoint's error)

    @property
    def depth(self) -> int:
        return len(self.activations)


@dataclass
class LocalRadii:
    """Per-sample radii: ``radius`` = max(global, every method's local radius), ``methods`` each method's own
    candidate (0 where it proves nothing); ``reason`` says why a model (or a method) gives nothing beyond the
    global radius (empty when it may)."""

    radius: torch.Tensor
    methods: dict[str, torch.Tensor]
    reason: str = ""


class LocalCertifier:
    """Built once per model (bounds, tails and float64 error plans), then ``radii`` per batch. ``method``:
    ``linear`` (all tail activations stable), ``lipschitz`` (the margin's Lipschitz bound over the ball with the
    activations that may switch left free), ``crown`` (bound propagation), or ``best`` (linear and lipschitz,
    the larger). ``at``: the radii a report asks about; the searched methods then test only those (just above
    each), instead of bisecting for the largest radius: a few times cheaper, and the same certified accuracy
    at those radii."""

    def __init__(self, graph: Graph, setup: CertificateSetup, *, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, max_depth: int = 1, method: str = "best",
                 prop: Propagation | None = None, at: Sequence[float] | None = None) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, not {method!r}")
        self.graph, self.setup, self.method = graph, setup, method
        self.at = None if at is None else sorted(float(v) for v in at if v > 0)
        self.mean, self.std = mean, std
        self.tails: list[Tail] = []
        self.reason = ""
        self.factor = (1.0 / min(std)) * (1 + 1e-12) if std else 1.0
        binary = math.prod(graph.value_shapes.get(graph.output, (2,))) == 1
        if binary:
            self.reason = "one logit: the local rule covers several logits only"
            return
        if not math.isfinite(setup.lipschitz):
            self.reason = "no finite global bound"
            return
        if graph.fixed_batch is not None:
            self.reason = "the model is fixed to one batch size"
            return
        self.prop = prop if prop is not None else propagate(graph, lower_bounds=False)
        self.tails, self.reason = _tails(graph, self.prop, max_depth, self.factor)
        if not self.tails:
            return
        self.plan64: ErrorPlan = error_plan(graph, self.prop.steps, self.prop.bounds, factors=self.prop.step_factors,
                                            dtype=torch.float64, mean=mean, std=std)
        self.module = GraphModule(graph).to(torch.float64).eval()
        self.consts = self.module.constants()
        self.needed = {a.step.inputs[0] for t in self.tails for a in t.activations} | {graph.output}
        self.errors64 = {v: dataclasses.replace(self.plan64, output=v).evaluate() for v in self.needed}

    def radii(self, x: torch.Tensor, prediction: torch.Tensor, radius: torch.Tensor,
              error_base: torch.Tensor | float, error_slope: float) -> LocalRadii:
        """Local radii of a batch of pixel-space inputs ``x`` whose deployed prediction and global radius are
        given; ``error_base`` (per sample) + ``error_slope`` r bounds the deployed logits' error over the ball of
        radius r around each sample (``Engine.error``)."""
        radius = radius.double().cpu()
        if not self.tails:
            return LocalRadii(radius, {}, self.reason)
        values, x_norm = self._forward(x)
        base = torch.as_tensor(error_base, dtype=torch.float64).expand(x.shape[0]).cpu()
        prediction = prediction.cpu()
        wanted = ("linear", "lipschitz") if self.method == "best" else (self.method,)
        methods = {m: torch.zeros_like(radius) for m in wanted}
        reasons = [self.reason] if self.reason else []
        for tail in self.tails:
            best = torch.maximum(radius, torch.stack(list(methods.values())).amax(dim=0))
            for m in wanted:
                if m == "linear":
                    found, why = self._linear(tail, values, x_norm, prediction, base, error_slope), ""
                elif m == "lipschitz":
                    found, why = self._search(tail, values, x_norm, prediction, base, error_slope, best, "lipschitz")
                else:
                    found, why = self._search(tail, values, x_norm, prediction, base, error_slope, best, "crown")
                methods[m] = torch.maximum(methods[m], found)
                if why:
                    reasons.append(why)
        local = torch.stack(list(methods.values())).amax(dim=0)
        return LocalRadii(torch.maximum(radius, local), methods, "; ".join(dict.fromkeys(reasons)))

    # -- the float64 values at the samples

    def _forward(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The needed values at each sample in float64 (on the CPU) and the samples' pixel-space norms."""
        z = x.detach().double().cpu()
        x_norm = sample_norms(z)
        if self.mean is not None and self.std is not None:
            view = (1, -1) + (1,) * (z.dim() - 2)
            z = (z - torch.tensor(self.mean, dtype=torch.float64).reshape(view)) / torch.tensor(
                self.std, dtype=torch.float64).reshape(view)
        found: dict[str, list[torch.Tensor]] = {}
        with torch.no_grad():
            for chunk in torch.split(z, 256):
                env = self.module.run_all(chunk)
                for name in self.needed:
                    found.setdefault(name, []).append(env[name].reshape(chunk.shape[0], -1))
        return {k: torch.cat(v) for k, v in found.items()}, x_norm

    def _error64(self, value: str, x_norm: torch.Tensor) -> torch.Tensor:
        """The float64 error bound (L2) of ``value`` computed at each sample (centre: the zero image)."""
        e = self.errors64[value]
        return (torch.as_tensor(e.base, dtype=torch.float64) + e.slope * x_norm) * (1 + SLACK)

    def _margins(self, values: dict[str, torch.Tensor], x_norm: torch.Tensor,
                 prediction: torch.Tensor) -> torch.Tensor:
        """Lower bounds on the exact margins z_y - z_j at each sample (inf at j = y)."""
        z = values[self.graph.output]
        gaps = z.gather(1, prediction[:, None]) - z - SQRT2 * self._error64(self.graph.output, x_norm)[:, None]
        gaps -= SLACK * z.abs().amax(dim=1, keepdim=True)
        return gaps.scatter(1, prediction[:, None], math.inf)

    # -- approach (a): exact local linearity

    def _linear(self, tail: Tail, values: dict[str, torch.Tensor], x_norm: torch.Tensor, prediction: torch.Tensor,
                base: torch.Tensor, slope: float) -> torch.Tensor:
        n = prediction.shape[0]
        out = torch.zeros(n, dtype=torch.float64)
        logits = values[self.graph.output].shape[1]
        per_row = tail_entries(self.graph, tail)
        chunk = max(1, MAX_ROW_ENTRIES // max(1, per_row * (logits + max(len(a.first) for a in tail.activations))))
        for start in range(0, n, chunk):
            sl = slice(start, start + chunk)
            out[sl] = self._linear_chunk(tail, {k: v[sl] for k, v in values.items()}, x_norm[sl], prediction[sl],
                                         base[sl], slope)
        return out

    def _linear_chunk(self, tail: Tail, values: dict[str, torch.Tensor], x_norm: torch.Tensor,
                      prediction: torch.Tensor, base: torch.Tensor, slope: float) -> torch.Tensor:
        lip = tail.body_lipschitz
        best = torch.full((prediction.shape[0],), math.inf, dtype=torch.float64)
        for k, act in enumerate(tail.activations):
            p = values[act.step.inputs[0]]
            sigma, pair = _switching(p, act)
            margin = sigma.abs() - (SQRT2 if pair else 1.0) * self._error64(act.step.inputs[0], x_norm)[:, None]
            rows, err = self._pull(tail, k, _switch_rows(act, p.shape[1]), values, shared=k == 0)
            norms = rows.norm(dim=2) * (1 + SLACK) + err
            best = torch.minimum(best, _ratio(margin, lip * norms).amin(dim=1))
        return torch.minimum(best, self._pattern_radii(tail, values, x_norm, prediction, base, slope))

    def _pattern_radii(self, tail: Tail, values: dict[str, torch.Tensor], x_norm: torch.Tensor,
                       prediction: torch.Tensor, base: torch.Tensor, slope: float) -> torch.Tensor:
        """The radius each sample's margins allow with the tail's Jacobian at the sample (its activation
        pattern): the whole answer where the pattern holds on the ball (``linear``), and a ceiling of the
        searched methods, whose gradient sets contain that Jacobian."""
        gaps = self._margins(values, x_norm, prediction)
        eye = torch.eye(gaps.shape[1], dtype=torch.float64)
        rows, err = self._pull(tail, tail.depth, eye[prediction][:, None, :] - eye[None, :, :], values, shared=False)
        norms = rows.norm(dim=2) * (1 + SLACK) + err
        radii = _ratio(gaps - SQRT2 * base[:, None], tail.body_lipschitz * norms + SQRT2 * slope)
        radii.scatter_(1, prediction[:, None], math.inf)
        return radii.amin(dim=1)

    def _pull(self, tail: Tail, level: int, rows: torch.Tensor, values: dict[str, torch.Tensor],
              shared: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows given on the input of activation ``level`` (the logits for level = depth), pulled back to the
        feature space h through the tail: (samples, rows, h entries) and a bound on each row's float64 error.
        ``shared``: the rows are the same for every sample (level 0: no activation in between)."""
        if rows.dim() == 2:
            rows = rows[None]
        n = 1 if shared else next(iter(values.values())).shape[0]
        rows = rows.expand(n, *rows.shape[1:]).contiguous()
        err = torch.zeros(rows.shape[:2], dtype=torch.float64)
        for k in range(level, -1, -1):
            step = tail.head if k == tail.depth else tail.linears[k]
            rows, err = _adjoint(step, rows, err, self.prop.step_factors.get(step.output, math.inf),
                                 tail.sizes[step.output])
            if k > 0:
                act = tail.activations[k - 1]
                rows = self._vjp(act, values[act.step.inputs[0]], rows)
                err = err + U64 * rows.norm(dim=2)
        return rows, err

    def _vjp(self, act: Activation, p: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Rows on the activation's output pulled back to its input at each sample: exact where it is stable
        (a selection of entries, with signs and the slope of a LeakyRelu)."""
        n, r = rows.shape[:2]
        in_shape = self.graph.value_shapes[act.step.inputs[0]]
        out_shape = self.graph.value_shapes[act.step.output]
        with torch.enable_grad():
            v = p.repeat_interleave(r, dim=0).reshape((n * r,) + tuple(in_shape)).requires_grad_(True)
            y = _run_step(act, v, self.consts)
            (grad,) = torch.autograd.grad(y, v, grad_outputs=rows.reshape((n * r,) + tuple(out_shape)))
        return grad.reshape(n, r, -1).detach()

    # -- approach (b): CROWN over the L2 ball, one activation layer

    def _search(self, tail: Tail, values: dict[str, torch.Tensor], x_norm: torch.Tensor, prediction: torch.Tensor,
                base: torch.Tensor, slope: float, start: torch.Tensor, method: str) -> tuple[torch.Tensor, str]:
        """The largest radius (by bisection, above ``start``) at which ``method``'s lower bound of every margin
        over the ball exceeds sqrt(2) E(r); 0 where none is found, and the reason when the tail has no relu
        form. The search is chunked over samples."""
        forms = []
        for act in tail.activations:
            form = _relu_form(act, self.graph, self.consts)
            if isinstance(form, str):
                return torch.zeros_like(start), f"{method}: {form}"
            forms.append(form)
        n = prediction.shape[0]
        out = torch.zeros(n, dtype=torch.float64)
        width = max([tail_entries(self.graph, tail)] + [v.shape[1] for v in values.values()])
        switches = sum(len(a.first) for a in tail.activations)
        rows = max([values[self.graph.output].shape[1]] + [len(a.first) for a in tail.activations])
        chunk = max(1, MAX_ROW_ENTRIES // max(1, width * (switches + 1) * rows))
        for first in range(0, n, chunk):
            sl = slice(first, first + chunk)
            part = {k: v[sl] for k, v in values.items()}
            # only the samples whose own pattern's radius passes a radius still to prove: every gradient set
            # bounded below holds that pattern's Jacobian, so the others cannot be certified there
            ceiling = self._pattern_radii(tail, part, x_norm[sl], prediction[sl], base[sl], slope) * SCREEN_SLACK
            if self.at is None:
                wanted = ceiling > start[sl]
            else:
                goals = torch.tensor(self.at, dtype=torch.float64)
                wanted = ((goals > start[sl, None]) & (goals <= ceiling[:, None])).any(dim=1)
            idx = first + wanted.nonzero().reshape(-1)
            if idx.numel():
                out[idx] = self._search_chunk(tail, {k: v[idx] for k, v in values.items()}, x_norm[idx],
                                              prediction[idx], base[idx], slope, start[idx], method, forms)
        return out, ""

    def _search_chunk(self, tail: Tail, values: dict[str, torch.Tensor], x_norm: torch.Tensor,
                      prediction: torch.Tensor, base: torch.Tensor, slope: float, start: torch.Tensor, method: str,
                      forms: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        n = prediction.shape[0]
        gaps = self._margins(values, x_norm, prediction)
        eye = torch.eye(gaps.shape[1], dtype=torch.float64)
        margin_rows = eye[prediction][:, None, :] - eye[None, :, :]
        switch_rows = [_switch_rows(a, values[a.step.inputs[0]].shape[1]) for a in tail.activations]
        run = _Bounds(self, tail, values, x_norm, forms)
        first_gain = run.gain(0, switch_rows[0][None], [])  # the first switches' gains: the same for every sample

        def lower(r: torch.Tensor) -> torch.Tensor:
            """A lower bound of min over the ball of radius r of every margin, minus sqrt(2) E(r)."""
            rho = tail.body_lipschitz * r[:, None]
            bounds: list[tuple[torch.Tensor, torch.Tensor]] = []
            for k, rows in enumerate(switch_rows):
                rows = rows.expand(n, *rows.shape)
                if method == "crown":
                    bounds.append((run.lower(k, rows, bounds, rho), -run.lower(k, -rows, bounds, rho)))
                else:
                    centre, _ = _switching(run.p[k], tail.activations[k])
                    centre_error = (SQRT2 if bool((tail.activations[k].second >= 0).any()) else 1.0) * run.e[k]
                    reach = rho * (first_gain if k == 0 else run.gain(k, rows, bounds))
                    bounds.append((centre - centre_error[:, None] - reach, centre + centre_error[:, None] + reach))
            if method == "crown":
                found = run.lower(tail.depth, margin_rows, bounds, rho, centre=gaps)
            else:
                found = gaps - rho * run.gain(tail.depth, margin_rows, bounds)
            bound = found - SQRT2 * (base[:, None] + slope * r[:, None])
            return bound.scatter(1, prediction[:, None], math.inf).amin(dim=1)

        certified = torch.zeros(n, dtype=torch.float64)
        if self.at is not None:
            for value in self.at:
                r = torch.full((n,), value * (1 + AT_MARGIN), dtype=torch.float64)
                todo = start < r
                if bool(todo.any()):
                    certified = torch.where(todo & (lower(r) > 0), r, certified)
            return certified
        lo_r = start.clone()
        hi_r = torch.maximum(2 * start, 4 * gaps.clamp_min(0).amin(dim=1) / max(tail.body_lipschitz, 1e-300))
        for _ in range(BISECTION_STEPS):
            mid = (lo_r + hi_r) / 2
            ok = lower(mid) > 0
            certified = torch.where(ok, torch.maximum(certified, mid), certified)
            lo_r = torch.where(ok, mid, lo_r)
            hi_r = torch.where(ok, hi_r, mid)
        return certified


class _Bounds:
    """The tail's backward passes at a batch of samples: ``gain`` (the ``lipschitz`` method) and ``lower``
    (CROWN). ``lower``, relative to the centre: for rows Lambda on the output of linear step t (p_t, or the
    logits), a lower bound of Lambda . p_t(x') over the ball, for each sample and row.

    With p_t(x') - p_t(x) = L_t (h_{t-1}(x') - h_{t-1}(x)), each activation relaxed as
    mu . act(p') >= w . p' + gamma (w = mu J0 + beta S, beta from CROWN's relu bounds on the switches' intervals),
    and the last pull-back to h minimised over the ball: - rho ||L_0^T w||. The float64 rounding of every
    pulled-back row is charged on its deviation over the ball, that of the centre terms by Higham's gamma."""

    def __init__(self, owner: LocalCertifier, tail: Tail, values: dict[str, torch.Tensor], x_norm: torch.Tensor,
                 forms: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.owner, self.tail, self.forms = owner, tail, forms
        factors = owner.prop.step_factors
        self.p = [values[a.step.inputs[0]] for a in tail.activations]
        self.h = [_run_step(a, p.reshape((p.shape[0],) + tuple(owner.graph.value_shapes[a.step.inputs[0]])),
                            owner.consts).reshape(p.shape[0], -1) for a, p in zip(tail.activations, self.p,
                                                                                   strict=True)]
        self.e = [owner._error64(a.step.inputs[0], x_norm) for a in tail.activations]
        self.logits = values[owner.graph.output]
        self.e_logits = owner._error64(owner.graph.output, x_norm)
        # reach of the ball: ||p_k(x') - p_k(x)|| <= rho reach_p[k], ||h_k(x') - h_k(x)|| <= rho reach_h[k]
        self.reach_p, self.reach_h = [], []
        gain = 1.0
        for lin, act in zip(tail.linears, tail.activations, strict=True):
            gain *= factors.get(lin.output, math.inf)
            self.reach_p.append(gain)
            gain *= factors.get(act.step.output, math.inf)
            self.reach_h.append(gain)
        self.smat = [_switch_rows(a, p.shape[1]) for a, p in zip(tail.activations, self.p, strict=True)]

    def lower(self, t: int, lam: torch.Tensor, bounds: list[tuple[torch.Tensor, torch.Tensor]],
              rho: torch.Tensor, centre: torch.Tensor | None = None) -> torch.Tensor:
        """Lower bounds (samples x rows) of Lambda . p_t over the ball; ``centre``: known lower bounds of its
        value at the sample (else computed from the float64 values and their error)."""
        tail, owner = self.tail, self.owner
        if centre is None:
            value = self.p[t] if t < tail.depth else self.logits
            error = self.e[t] if t < tail.depth else self.e_logits
            centre = torch.einsum("nrw,nw->nr", lam, value)
            centre = centre - lam.norm(dim=2) * error[:, None] - gamma(value.shape[1] + 4, U64) * torch.einsum(
                "nrw,nw->nr", lam.abs(), value.abs())
        acc = centre
        for k in range(t, 0, -1):
            step = tail.head if k == tail.depth else tail.linears[k]
            mu, err = _adjoint(step, lam, torch.zeros(lam.shape[:2], dtype=torch.float64),
                               owner.prop.step_factors.get(step.output, math.inf), tail.sizes[step.output])
            acc = acc - err * rho * self.reach_h[k - 1]
            lam, relaxed = self._relax(k - 1, mu, bounds[k - 1], rho)
            acc = acc + relaxed
        step = tail.linears[0]
        mu, err = _adjoint(step, lam, torch.zeros(lam.shape[:2], dtype=torch.float64),
                           owner.prop.step_factors.get(step.output, math.inf), tail.sizes[step.output])
        return acc - rho * (mu.norm(dim=2) * (1 + SLACK) + err)

    def gain(self, t: int, rows: torch.Tensor, bounds: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """An upper bound (samples x rows) on the Lipschitz constant of rows . p_t over the ball, in feature
        space: every gradient there is rows^T L_t J_{t-1} ... J_0 L_0 with J_k the Jacobian of activation k,
        J0 + G diag(a) S, a_i fixed (0 or 1) on a switch whose interval keeps its sign and a_i in [0, 1] on one
        that may switch. Written a_i = a0_i + eta_i / 2 (a0_i = 1/2, |eta_i| <= 1), the gradients form the set
        u + sum_m eps_m g_m, |eps_m| <= 1 (each free switch adds a generator whose size bounds (v . G_i) / 2 over
        the set so far), and ||u + sum eps_m g_m||^2 <= ||u||^2 + 2 sum |g_m . u| + sum_{m,m'} |g_m . g_m'|;
        the triangle bound ||u|| + sum ||g_m|| is used where smaller. Float64 errors of the rows (``_adjoint``)
        are added; the sums of non-negative terms are raised by their gamma."""
        tail, owner = self.tail, self.owner
        n, r = rows.shape[:2]
        u = rows
        gens = rows.new_zeros(n, r, 0, rows.shape[2])
        err = torch.zeros(n, r, dtype=torch.float64)  # sum of the float64 errors of u and of every generator
        for k in range(t, -1, -1):
            step = tail.head if k == tail.depth else tail.linears[k]
            factor = owner.prop.step_factors.get(step.output, math.inf)
            u, e_u = _adjoint(step, u, err, factor, tail.sizes[step.output])
            m = gens.shape[2]
            if m:
                pulled, e_g = _adjoint(step, gens.reshape(n, r * m, -1), torch.zeros(n, r * m, dtype=torch.float64),
                                       factor, tail.sizes[step.output])
                gens = pulled.reshape(n, r, m, -1)
                e_u = e_u + e_g.reshape(n, r, m).sum(dim=2)
            else:
                gens = u.new_zeros(n, r, 0, u.shape[2])
            err = e_u
            if k == 0:
                break
            j0, g = self.forms[k - 1]
            smat = self.smat[k - 1]
            lo, hi = bounds[k - 1]
            free = (lo <= 0) & (hi >= 0)
            on = (lo > 0).double() + 0.5 * free.double()  # (n, switches)
            # v -> v J0 + ((v G) * a0) S, the gradient's mean part
            def mean(v: torch.Tensor, on: torch.Tensor = on, j0: torch.Tensor = j0, g: torch.Tensor = g,
                     smat: torch.Tensor = smat) -> torch.Tensor:
                scale = on.reshape((on.shape[0],) + (1,) * (v.dim() - 2) + (on.shape[1],))
                return v @ j0 + ((v @ g) * scale) @ smat
            # bounds |v . G_i| over the set (the rows' float64 error included)
            size = (u @ g).abs() + (gens @ g).abs().sum(dim=2) + err[..., None] * g.norm(dim=0)
            size = size * (1 + gamma(gens.shape[2] + g.shape[0] + 8, U64))
            new = (0.5 * size * free[:, None, :].double())[..., None] * smat  # (n, r, switches, p entries)
            u, gens = mean(u), torch.cat([mean(gens), new[:, :, free.any(dim=0)]], dim=2)
        norm_u = u.norm(dim=2)
        gram = (gens @ gens.transpose(2, 3)).abs().sum(dim=(2, 3))
        cross = (gens @ u[..., None]).abs().sum(dim=(2, 3))
        m = gens.shape[2]
        inflate = 1 + gamma(u.shape[2] + m * m + 8, U64)
        joint = torch.sqrt((norm_u ** 2 + 2 * cross + gram) * inflate) * (1 + SLACK)
        triangle = (norm_u + gens.norm(dim=3).sum(dim=2)) * (1 + SLACK)
        return torch.minimum(joint, triangle) + err

    def _relax(self, k: int, mu: torch.Tensor, bound: tuple[torch.Tensor, torch.Tensor],
               rho: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows mu on activation k's output -> (rows w on its input, a lower bound of the centre term
        w . p + gamma - mu . act(p)), so that mu . (act(p') - act(p)) >= w . (p' - p) + that term."""
        j0, g = self.forms[k]
        smat, p, h, e = self.smat[k], self.p[k], self.h[k], self.e[k]
        lo, hi = bound
        lam = mu @ g  # coefficients of relu(s)
        unstable = (lo < 0) & (hi > 0)
        up = torch.where(unstable, hi / (hi - lo).clamp_min(1e-300), (lo >= 0).double())[:, None, :]
        down = torch.where(unstable, (hi > -lo).double(), (lo >= 0).double())[:, None, :]
        beta = torch.where(lam >= 0, lam * down, lam * up)
        offset = torch.where((lam < 0) & unstable[:, None, :], -lam * up * lo[:, None, :], torch.zeros_like(lam))
        offset = offset.sum(dim=2)
        lin = mu @ j0
        w = lin + beta @ smat
        term = torch.einsum("nrw,nw->nr", w, p) + offset - torch.einsum("nro,no->nr", mu, h)
        size = (torch.einsum("nrw,nw->nr", w.abs(), p.abs()) + offset.abs()
                + torch.einsum("nro,no->nr", mu.abs(), h.abs()))
        w_abs = (lin.abs() + beta.abs() @ smat.abs()).norm(dim=2)
        deviation = rho * self.reach_p[k] + p.norm(dim=1)[:, None] + e[:, None]
        term = term - gamma(4 * p.shape[1] + 8, U64) * (size + w_abs * deviation)
        term = term - (w.norm(dim=2) + mu.norm(dim=2)) * e[:, None]
        return w, term


def _ratio(gap: torch.Tensor, slope: torch.Tensor | float) -> torch.Tensor:
    """gap / slope as a radius: 0 unless the gap is positive, inf when nothing moves it."""
    slope = torch.as_tensor(slope, dtype=torch.float64).expand_as(gap)
    moving = torch.where(slope > 0, gap / slope.clamp_min(1e-300), torch.full_like(gap, math.inf))
    return torch.where(gap > 0, moving, torch.zeros_like(gap))


def _switching(p: torch.Tensor, act: Activation) -> tuple[torch.Tensor, bool]:
    """The switching functionals' values at each sample, and whether they are differences of two entries."""
    pair = bool((act.second >= 0).any())
    s = p[:, act.first] - torch.where(act.second >= 0, p[:, act.second.clamp_min(0)], torch.zeros(()))
    return s, pair


def _switch_rows(act: Activation, width: int) -> torch.Tensor:
    """The switching functionals as rows over the activation's input entries (switches x width)."""
    rows = torch.zeros(len(act.first), width, dtype=torch.float64)
    idx = torch.arange(len(act.first))
    rows[idx, act.first] = 1.0
    has = act.second >= 0
    rows[idx[has], act.second[has]] = -1.0
    return rows


def _adjoint(step: Step, rows: torch.Tensor, err: torch.Tensor, factor: float,
             size: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows on a linear step's output pulled back to its input (A^T), with their float64 error: the incoming
    error carried by the step's norm bound plus gamma_n || |A| ||, n the step's in + out entries (longer than
    any accumulation of its adjoint), times the row's norm."""
    op = step.linear
    n, r = rows.shape[:2]
    with torch.no_grad():
        pulled = op.adjoint(rows.reshape((n * r,) + tuple(op.out_shape))).reshape(n, r, -1)
    err = err * factor + gamma(op.in_numel + op.out_numel + 8, U64) * size * rows.norm(dim=2)
    return pulled, err * (1 + SLACK)


def _abs_norm(step: Step) -> float:
    """An upper bound on || |A| || for a linear step (its parts' |W| maps composed): inf when one is unknown."""
    maps = [p.rounding.abs_op for p in step.parts if p.rounding is not None]
    if not step.parts or len(maps) < len(step.parts) or any(m is None for m in maps):
        return math.inf
    return math.prod(nonnegative_norm(m) for m in maps if m is not None) * (1 + SLACK)


def _run_step(act: Activation, v: torch.Tensor, consts: dict[str, torch.Tensor]) -> torch.Tensor:
    """Run an activation step's own nodes on ``v`` (its input, batched)."""
    env = dict(consts)
    env[act.step.inputs[0]] = v
    ctx = RunContext(v.dtype)
    for node in act.nodes:
        outs = REGISTRY[node.op].run(node, [env[i] if i else None for i in node.inputs], ctx)
        for name, value in zip(node.outputs, outs, strict=False):
            if name:
                env[name] = value
    return env[act.step.output]


def _relu_form(act: Activation, graph: Graph,
               consts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | str:
    """(J0, G) with act(p) = J0 p + G relu(S p) (S the switching rows), checked on the two sign patterns of every
    switch: needs each input entry in at most one switch; else the reason (a string)."""
    width = math.prod(graph.value_shapes[act.step.inputs[0]])
    used = torch.cat([act.first, act.second[act.second >= 0]])
    if used.unique().numel() != used.numel():
        return "a switch shares an entry with another (GroupSort groups above 2)"
    smat = _switch_rows(act, width)
    shape = (1,) + tuple(graph.value_shapes[act.step.inputs[0]])

    def jac(point: torch.Tensor) -> torch.Tensor:
        return torch.autograd.functional.jacobian(
            lambda q: _run_step(act, q.reshape(shape), consts).reshape(-1), point)

    negative = -smat.sum(dim=0)  # every switch at -1 or -2
    j_neg, j_pos = jac(negative), jac(-negative)
    g = (j_pos - j_neg) @ smat.T / (smat * smat).sum(dim=1)[None, :]
    for sign in (1.0, -1.0):  # the form reproduces the function at two points of mixed signs
        probe = sign * torch.linspace(-1.0, 1.5, width, dtype=torch.float64) + 0.01
        want = _run_step(act, probe.reshape(shape), consts).reshape(-1)
        got = j_neg @ probe + g @ torch.relu(smat @ probe)
        if not torch.allclose(got, want, rtol=0, atol=1e-12):
            return "the activation is not of the form J0 p + G relu(S p)"
    return j_neg, g


def tail_entries(graph: Graph, tail: Tail) -> int:
    """The feature space's size (entries of h)."""
    return math.prod(graph.value_shapes.get(tail.start, (1,)))


def _activation(graph: Graph, step: Step) -> Activation | str:
    """The tail form of a nonlinear step, or why it has none."""
    names = set(step.nodes)
    nodes = [n for n in graph.nodes if n.name in names]
    shape = graph.value_shapes.get(step.inputs[0]) if step.inputs else None
    if shape is None or len(step.inputs) != 1 or step.output not in graph.value_shapes:
        return f"{step.label}: not one input and an output of known shapes"
    idx = torch.arange(math.prod(shape))
    if isinstance(step.details, Rule) and len(nodes) == 1 and REGISTRY[nodes[0].op].kink_at_zero:
        return Activation(step, idx, torch.full_like(idx, -1), nodes)
    if isinstance(step.details, Pattern) and step.details.switches is not None:
        first, second = step.details.switches
        return Activation(step, first, second, nodes)
    return f"{step.label}: not a piecewise-linear activation with known switches"


def _tails(graph: Graph, prop: Propagation, max_depth: int, factor: float) -> tuple[list[Tail], str]:
    """Every tail of 1..max_depth activations that ends the network, and why no deeper one exists."""
    steps = prop.steps
    if not steps or not isinstance(steps[-1].details, Linear) or steps[-1].output != graph.output:
        return [], "the network does not end with a linear step"
    readers: dict[str, int] = {}
    for s in steps:
        for i in s.inputs:
            readers[i] = readers.get(i, 0) + 1
    head = steps[-1]
    tails: list[Tail] = []
    sizes = {head.output: _abs_norm(head)}
    linears: list[Step] = []
    acts: list[Activation] = []
    at = len(steps) - 1
    reason = ""
    while len(acts) < max_depth:
        if at < 2:
            reason = "the network has no further block"
            break
        act_step, lin = steps[at - 1], steps[at - 2]
        inner = steps[at]
        if not isinstance(lin.details, Linear) or len(lin.inputs) != 1:
            reason = f"{lin.label}: not a linear step before {act_step.label}"
            break
        chained = (act_step.output == inner.inputs[0] and lin.output == act_step.inputs[0]
                   and len(inner.inputs) == 1 and readers.get(act_step.output) == 1
                   and readers.get(lin.output) == 1
                   and act_step.output not in graph.outputs and lin.output not in graph.outputs)
        if not chained:
            reason = f"{act_step.label}: the tail is not one chain there"
            break
        act = _activation(graph, act_step)
        if isinstance(act, str):
            reason = act
            break
        if act.first.numel() > MAX_SWITCHES:
            reason = (f"{act_step.label}: {act.first.numel()} switching activations, more than the {MAX_SWITCHES} "
                      "local certificates analyse")
            break
        linears.insert(0, lin)
        acts.insert(0, act)
        at -= 2
        start = lin.inputs[0]
        body = 1.0 if start == graph.input_name else prop.bounds.get(start, math.inf)
        if not math.isfinite(body):
            reason = f"the body up to {start!r} has no finite bound"
            break
        sizes[lin.output] = _abs_norm(lin)
        if not all(math.isfinite(v) for v in sizes.values()):
            reason = "a tail step's float evaluation is unknown"
            break
        tails.append(Tail(start, body * factor, list(linears), list(acts), head, dict(sizes)))
    return tails, reason


def local_radii(graph: Graph, setup: CertificateSetup, x: torch.Tensor, logits: torch.Tensor,
                radius: torch.Tensor, *, error_base: torch.Tensor | float | None = None,
                error_slope: float | None = None,
                mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                method: str = "best", max_depth: int = 1) -> LocalRadii:
    """Local radii for one batch (``LocalCertifier`` once per model is cheaper for many). Without an error
    allowance, the global one around the zero image: setup.error_base + setup.error_slope (||x|| + r)."""
    certifier = LocalCertifier(graph, setup, mean=mean, std=std, max_depth=max_depth, method=method)
    prediction = logits.double().argmax(dim=1).cpu()
    if error_base is None or error_slope is None:
        norms = sample_norms(x.detach().double().cpu())
        error_base, error_slope = setup.error_base + setup.error_slope * norms, setup.error_slope
    return certifier.radii(x, prediction, radius, torch.as_tensor(error_base, dtype=torch.float64), error_slope)
