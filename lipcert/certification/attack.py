"""PGD attacks beside every certificate: empirical robustness, and a hard failure on any contradiction.

Standard PGD (Madry et al. 2018) with a margin loss (largest other logit minus the true logit; for a model with
one logit s, a binary classifier, s for label 0 and -s for label 1), a random start in the eps-ball, steps of
alpha = 2.5 eps / steps along the normalised gradient (L2) or its sign (L-infinity), projection onto the ball
(the float point itself inside it) and onto the valid input box [0, 1], restarts in the batch dimension,
and the best example kept. Only points still unbroken are attacked, in increasing eps (a point broken at
eps_i is broken for every larger eps), and a point stops being attacked at the step it falls. Every adversarial
example is checked by a fresh forward pass before it counts; a certified point that the attack flips within its
certified radius is a soundness violation.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace

import torch

from lipcert.certification.radii import sample_norms
from lipcert.certification.settings import SETTINGS
from lipcert.errors import ConfigError
from lipcert.parse import NORMS

#: the step-size rule, documented in the report: alpha = STEP_FACTOR * eps / steps
STEP_FACTOR = 2.5


@dataclass
class AttackConfig:
    """Settings of the PGD attack, checked when made (a ``ConfigError`` naming the parameter); ``steps``,
    ``restarts``, ``seed`` and ``precision`` are the settings ``attack_steps``, ``attack_restarts``, ``seed`` and
    ``attack_precision`` of ``settings.SETTINGS``."""

    steps: int = SETTINGS["attack_steps"].field()
    restarts: int = SETTINGS["attack_restarts"].field()
    #: the ball's norm: None (the default) takes the run's norm in ``certify`` and ``attack`` (``pgd`` alone: l2)
    norm: str | None = None
    seed: int = SETTINGS["seed"].field()
    lower: float = 0.0
    upper: float = 1.0
    #: "float32", or "bfloat16" for the attack's steps (autocast); examples are always re-checked in float32
    precision: str = SETTINGS["attack_precision"].field()

    def __post_init__(self) -> None:
        for f in fields(self):
            if "setting" in f.metadata:
                object.__setattr__(self, f.name, f.metadata["setting"].validate(getattr(self, f.name), f.name))
        if self.norm is not None and self.norm not in NORMS:
            raise ConfigError(f"norm must be l2 or linf, got {self.norm!r}", parameter="norm")
        if not all(isinstance(v, numbers.Real) and math.isfinite(v) for v in (self.lower, self.upper)) \
                or self.lower >= self.upper:
            raise ConfigError(f"lower and upper must be finite numbers, lower below upper, got {self.lower!r} and "
                              f"{self.upper!r}", parameter=("lower", "upper"))

    def in_norm(self, norm: str) -> AttackConfig:
        """These settings for a run certified in ``norm``: the attack's balls must be the certificates' balls."""
        if self.norm not in (None, norm):
            raise ConfigError(f"the attack's norm {self.norm!r} differs from norm {norm!r}: leave AttackConfig.norm "
                              "unset to attack in the run's norm", parameter="norm")
        return replace(self, norm=norm)

    @property
    def ball(self) -> str:
        """The norm of the balls attacked: ``norm``, l2 when none was given (``pgd`` and ``attack_batch`` called on
        their own)."""
        return self.norm or "l2"


@dataclass
class Violation:
    """A certified point that the attack flipped inside its certified radius."""

    index: int
    label: int
    certified_radius: float
    eps: float
    adversarial_distance: float
    adversarial_class: int
    logit_true: float
    logit_adversarial: float


@dataclass(frozen=True)
class EpsAttack:
    """The attack at one radius: the empirical robust accuracy over all samples (correct and unbroken up to
    ``eps``), and how many correctly classified points it broke at or below ``eps``."""

    eps: float
    label: str
    robust_accuracy: float
    broken: int


@dataclass
class AttackSummary:
    """What the attack found over the whole dataset."""

    method: str
    steps: int
    restarts: int
    step_rule: str
    seed: int
    per_eps: list[EpsAttack]
    violations: list[Violation]
    attack_radius: torch.Tensor = field(repr=False)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        data = {k: v for k, v in asdict(self).items() if k not in ("attack_radius", "seconds")}
        data["violations"] = [asdict(v) for v in self.violations]
        return data


def _shape(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def predict(logits: torch.Tensor) -> torch.Tensor:
    """The class of each row of logits: the argmax, or for one logit s (a binary model) 1 when s > 0."""
    return (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(dim=1)


def class_logit(logits: torch.Tensor, cls: int) -> float:
    """The logit of class ``cls`` in one row; a binary model's one logit s reads as the two logits (0, s), which
    ``predict`` and ``margin_loss`` agree with."""
    if logits.shape[-1] == 1:
        return float(logits[0]) if cls == 1 else 0.0
    return float(logits[cls])


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """max_{j != y} z_j - z_y, positive only when the point is misclassified (0 at a tie). For one logit s (a
    binary model): -s for label 1 and s for label 0, so that PGD pushes s across 0, towards the other class."""
    if logits.shape[1] == 1:
        s = logits[:, 0]
        return torch.where(y == 1, -s, s)
    true = logits.gather(1, y[:, None])[:, 0]
    others = logits.scatter(1, y[:, None], -math.inf)
    return others.amax(dim=1) - true


#: times a projection pulls back the rows that rounding carried past eps (each time twice as far)
PROJECTION_TRIES = 4


def _project(delta: torch.Tensor, x: torch.Tensor, eps: float, cfg: AttackConfig) -> torch.Tensor:
    """``delta`` projected onto the eps-ball and the box, such that the float point x + delta itself lies within eps
    of x: rounding x + delta can carry a point on the sphere past eps (by up to half an ulp of x per entry, much
    more than eps x 1e-6 at small radii), and the final check would then refuse it. Such rows are pulled back
    inside by a bound on that rounding."""
    for attempt in range(PROJECTION_TRIES):
        if cfg.ball == "l2":
            n = sample_norms(delta)
            delta = delta * _shape(torch.clamp(eps / n.clamp_min(1e-12), max=1.0), delta)
        else:
            delta = delta.clamp(-eps, eps)
        out = (x + delta).clamp(cfg.lower, cfg.upper) - x
        size = sample_norms(out, cfg.ball)
        over = size > eps
        if not bool(over.any()):
            break
        rounding = sample_norms(torch.finfo(out.dtype).eps * (x.abs() + out.abs()), cfg.ball) * 2 ** attempt
        scale = ((eps - rounding) / size.clamp_min(1e-30)).clamp_min(0.0)
        delta = out * _shape(torch.where(over, scale, torch.ones_like(scale)), out)
    return out


def _random_start(x: torch.Tensor, eps: float, cfg: AttackConfig, gen: torch.Generator) -> torch.Tensor:
    if cfg.ball == "l2":
        d = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
        d = d / _shape(sample_norms(d).clamp_min(1e-12), d)
        r = torch.rand(x.shape[0], generator=gen, dtype=x.dtype).to(x.device) ** (1.0 / x[0].numel())
        d = d * _shape(r * eps, d)
    else:
        d = (torch.rand(x.shape, generator=gen, dtype=x.dtype).to(x.device) * 2 - 1) * eps
    return _project(d, x, eps, cfg)


def pgd(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, eps: float,
        cfg: AttackConfig, gen: torch.Generator,
        on_step: Callable[[int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Best adversarial examples over restarts and steps: (examples, found mask), checked afresh.

    A sample stops being attacked (all its restarts) as soon as one restart misclassifies it. ``on_step`` is
    called with the number of steps done (of ``cfg.steps + 1``) after each one."""
    n = x.shape[0]
    xr = x.repeat(cfg.restarts, *([1] * (x.dim() - 1)))
    yr = y.repeat(cfg.restarts)
    alpha = STEP_FACTOR * eps / cfg.steps
    delta = _random_start(xr, eps, cfg, gen)
    best_loss = torch.full((xr.shape[0],), -math.inf, device=x.device)
    best = xr.clone()
    active = torch.ones(xr.shape[0], dtype=torch.bool, device=x.device)
    for step_index in range(cfg.steps + 1):
        rows = active.nonzero()[:, 0]
        if rows.numel() == 0:
            break
        d = delta[rows].requires_grad_(True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bfloat16"):
            logits = model(xr[rows] + d)
        loss = margin_loss(logits.float(), yr[rows])
        (grad,) = torch.autograd.grad(loss.sum(), d)
        with torch.no_grad():
            loss = loss.detach()
            better = loss > best_loss[rows]
            best[rows[better]] = xr[rows[better]] + d.detach()[better]
            best_loss[rows[better]] = loss[better]
            done = torch.zeros(n, dtype=torch.bool, device=x.device)
            done[rows[loss > 0] % n] = True
            active &= ~done.repeat(cfg.restarts)
            step = grad / _shape(sample_norms(grad).clamp_min(1e-12), grad) if cfg.ball == "l2" else grad.sign()
            delta[rows] = _project(d.detach() + alpha * step, xr[rows], eps, cfg)
        if on_step:
            on_step(step_index + 1)
    with torch.no_grad():
        pick = best_loss.reshape(cfg.restarts, n).argmax(dim=0)
        chosen = best.reshape(cfg.restarts, n, *x.shape[1:])[pick, torch.arange(n, device=x.device)]
        fresh = model(chosen)
        found = (predict(fresh) != y) & (sample_norms(chosen - x, cfg.ball) <= eps * (1 + 1e-6))
    return chosen.detach(), found


def batch_generator(seed: int, index: int) -> torch.Generator:
    """The random stream of one batch: the same whichever process runs the batch, and after a resume."""
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


@dataclass
class BatchAttack:
    """The attack's results on one batch of samples."""

    attack_radius: torch.Tensor
    broken_at: torch.Tensor
    violations: list[Violation]


class _Share:
    """Reports the share of a batch's attack done, as increments that add up to 1, to a progress callback."""

    def __init__(self, progress: Callable[[float], None] | None) -> None:
        self.progress, self.done = progress, 0.0

    def reach(self, share: float) -> None:
        if self.progress and share > self.done:
            self.progress(share - self.done)
            self.done = share


def attack_batch(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                 predictions: torch.Tensor, radii: torch.Tensor, offset: int, eps: Sequence[tuple[str, float]],
                 cfg: AttackConfig, gen: torch.Generator,
                 progress: Callable[[float], None] | None = None) -> BatchAttack:
    """Attack the correctly classified samples of one batch at each eps in increasing order, while unbroken.

    ``radii`` are the certified radii in the attack's norm; a verified example closer than a point's radius
    is a violation. The attack radius of a sample is the distance of its verified adversarial example (0
    when misclassified, inf when never broken); ``broken_at`` is the eps at which it fell. ``progress``
    receives the share of the batch's work done since its last call, after every PGD step (the shares add
    up to 1: each positive eps counts the same, its steps equally).
    """
    n = len(y)
    attack_radius = torch.full((n,), math.inf, dtype=torch.float64)
    broken_at = torch.full((n,), math.inf, dtype=torch.float64)
    wrong = predictions.cpu() != y.cpu()
    attack_radius[wrong] = 0.0
    broken_at[wrong] = 0.0
    alive = ~wrong
    violations: list[Violation] = []
    radii_to_attack = sorted(value for _, value in eps if value > 0)
    share = _Share(progress)
    for k, value in enumerate(radii_to_attack):
        if not bool(alive.any()):
            break
        sel = alive.nonzero()[:, 0]
        sel_d = sel.to(x.device)

        def on_step(steps: int, k: int = k) -> None:
            share.reach((k + steps / (cfg.steps + 1)) / len(radii_to_attack))

        adv, found = pgd(model, x[sel_d], y[sel_d], value, cfg, gen, on_step)
        share.reach((k + 1) / len(radii_to_attack))
        found = found.cpu()
        hit = sel[found]
        if not hit.numel():
            continue
        hit_d = hit.to(x.device)
        dist = sample_norms(adv[found.to(x.device)] - x[hit_d], cfg.ball).double().cpu()
        attack_radius[hit] = dist
        broken_at[hit] = value
        alive[hit] = False
        with torch.no_grad():
            adv_logits = model(adv[found.to(x.device)]).double().cpu()
        for j, i in enumerate(hit.tolist()):
            if radii[i] > dist[j]:
                label = int(y[i])
                cls = int(predict(adv_logits[j:j + 1])[0])
                violations.append(Violation(offset + i, label, float(radii[i]), value, float(dist[j]), cls,
                                            class_logit(adv_logits[j], label), class_logit(adv_logits[j], cls)))
    share.reach(1.0)
    return BatchAttack(attack_radius, broken_at, violations)


def summarize_attack(cfg: AttackConfig, eps: Sequence[tuple[str, float]], attack_radius: torch.Tensor,
                     broken_at: torch.Tensor, violations: list[Violation], seconds: float,
                     binary: bool = False) -> AttackSummary:
    """Per-eps empirical robust accuracy over all samples (robust: correct and unbroken up to eps); ``binary``
    names the one-logit loss in the method."""
    total = int(broken_at.numel())
    per_eps = [EpsAttack(value, label, float((broken_at > value).double().mean()) if total else 0.0,
                         int(((broken_at <= value) & (broken_at > 0)).sum())) for label, value in eps]
    loss = "one-logit margin loss (s for label 0, -s for label 1)" if binary else "margin loss"
    method = f"PGD-{'L2' if cfg.ball == 'l2' else 'Linf'}, {loss}, random start"
    return AttackSummary(method, cfg.steps, cfg.restarts, f"alpha = {STEP_FACTOR} * eps / steps", cfg.seed, per_eps,
                         sorted(violations, key=lambda v: v.index), attack_radius, seconds)

