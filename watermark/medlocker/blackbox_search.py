"""Black-box placement of a visible mark: basin-hopping evolution (Adv-watermark style).

The attacker (here: the data owner protecting an image) sees a classifier only through
``predict(images B×C×H×W in [0, 1]) -> probabilities B×K`` and searches the mark's
top-left position ``(x, y)`` and opacity ``alpha`` so that the prediction is no longer
the image's true label, while the mark never touches the lesion region.

Algorithm (after "Adv-watermark: A Novel Watermark Perturbation for Adversarial
Examples", Jia et al. 2020, basin-hopping evolution):

1. *Population*: ``population`` candidates drawn uniformly from the allowed positions
   (the region-free positions of :func:`watermark.medlocker.regions.allowed_positions`) with
   ``alpha`` uniform in ``alpha_range``.
2. *Evolution* (each generation): differential-evolution mutants
   ``a + F (b - c)`` of three random members, crossed over with each member, each
   candidate then projected onto the nearest allowed position and the alpha range.
   A child replaces its parent if its fitness (the true-class probability; lower is
   better) is lower.
3. *Basin hopping*: the best candidate is additionally perturbed by Gaussian steps of
   ``position_step`` px / ``alpha_step`` (a local search around the current basin);
   after ``patience`` generations without improvement the worst half of the population
   is re-drawn at random (the hop to another basin).
4. Stops as soon as one candidate is misclassified (success), or when the query budget
   is spent. Every image sent to ``predict`` is one query; the count is returned.

Candidates are evaluated exactly as a published protected image would be seen: integer
position, blend, rounding to uint8 (``floor(v * 255 + 0.5) / 255``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

from watermark.imageio import quantise
from watermark.medlocker.logo import composite


@dataclass(frozen=True)
class SearchConfig:
    """Hyper-parameters of the search (defaults live in ``configs/method/*.yaml``).

    Attributes:
        population: candidates per generation (>= 4 for DE mutation).
        generations: maximum number of generations.
        query_budget: maximum images sent to ``predict`` per protected image.
        alpha_range: ``(min, max)`` opacity, within [0, 1].
        position_step: std of the basin-hopping position step, pixels.
        alpha_step: std of the basin-hopping opacity step.
        differential_weight: DE factor F.
        crossover: DE crossover probability per coordinate.
        patience: generations without improvement before the worst half is re-drawn.
        seed: RNG seed (the search is deterministic given the model).
    """

    population: int = 16
    generations: int = 30
    query_budget: int = 600
    alpha_range: tuple[float, float] = (0.5, 1.0)
    position_step: float = 4.0
    alpha_step: float = 0.1
    differential_weight: float = 0.7
    crossover: float = 0.7
    patience: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        lo, hi = self.alpha_range
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"alpha_range must satisfy 0 <= min <= max <= 1, got {self.alpha_range}")
        if self.population < 4:
            raise ValueError(f"population must be >= 4, got {self.population}")
        if self.generations < 0 or self.query_budget < 1:
            raise ValueError("generations must be >= 0 and query_budget >= 1")


@dataclass
class SearchResult:
    """Outcome for one image: the best placement found and what it cost."""

    x: int
    y: int
    alpha: float
    success: bool
    queries: int
    true_prob: float
    predicted: int

    def as_dict(self) -> dict:
        return asdict(self)


class QueryCounter:
    """Wraps ``predict`` so every image sent counts as one query; ``max_batch`` splits large calls."""

    def __init__(self, predict: Callable[[Tensor], Tensor], max_batch: int = 256):
        self.predict = predict
        self.max_batch = int(max_batch)
        self.queries = 0

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        outs = []
        for start in range(0, images.shape[0], self.max_batch):
            chunk = images[start:start + self.max_batch]
            self.queries += int(chunk.shape[0])
            outs.append(torch.as_tensor(self.predict(chunk)).float().cpu())
        return torch.cat(outs)


class _Search:
    """The state of one image's search: candidates are rows ``(y, x, alpha)`` of float64 arrays."""

    def __init__(self, counter: QueryCounter, image: Tensor, label: int, logo, coords: np.ndarray,
                 config: SearchConfig, scale: float):
        self.counter, self.label, self.logo, self.coords = counter, label, logo, coords
        self.config, self.scale = config, scale
        self.image = image.detach().float().cpu()
        self.start_queries = counter.queries
        self.rng = np.random.default_rng(config.seed)
        self.lo, self.hi = config.alpha_range

    def used(self) -> int:
        """Queries spent by this search so far."""
        return self.counter.queries - self.start_queries

    def project(self, pop: np.ndarray) -> np.ndarray:
        """Nearest allowed ``(y, x)`` for each candidate (N×3), alpha clipped to the range."""
        d = ((pop[:, None, :2] - self.coords[None, :, :].astype(np.float64)) ** 2).sum(-1)
        near = self.coords[d.argmin(1)]
        return np.concatenate([near.astype(np.float64), np.clip(pop[:, 2:3], self.lo, self.hi)], axis=1)

    def evaluate(self, pop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """True-class probability and predicted class of the first candidates the budget allows."""
        pop = pop[:max(0, self.config.query_budget - self.used())]
        if len(pop) == 0:
            return np.zeros(0), np.zeros(0, dtype=np.int64)
        batch = self.image.unsqueeze(0).expand(len(pop), -1, -1, -1)
        marked = composite(batch, self.logo, [int(p[1]) for p in pop], [int(p[0]) for p in pop],
                           [float(p[2]) for p in pop], self.scale)
        probs = self.counter(quantise(marked))
        return probs[:, self.label].numpy().astype(np.float64), probs.argmax(1).numpy()

    def draw(self, n: int) -> np.ndarray:
        """``n`` candidates uniform over the allowed positions and the alpha range (N×3)."""
        pos = self.coords[self.rng.integers(0, len(self.coords), size=n)].astype(np.float64)
        return np.concatenate([pos, self.rng.uniform(self.lo, self.hi, size=(n, 1))], axis=1)

    def children(self, pop: np.ndarray, best: np.ndarray) -> np.ndarray:
        """DE mutants ``a + F (b - c)`` crossed with ``pop``; the first two replaced by basin-hopping
        Gaussian steps around ``best``; projected onto the allowed positions (N×3)."""
        cfg, rng, n = self.config, self.rng, len(pop)
        idx = np.array([rng.choice(n, 3, replace=False) for _ in range(n)])
        mutant = pop[idx[:, 0]] + cfg.differential_weight * (pop[idx[:, 1]] - pop[idx[:, 2]])
        cross = rng.random(pop.shape) < cfg.crossover
        children = np.where(cross, mutant, pop)
        local = np.repeat(best[None], min(2, n), axis=0)
        local[:, :2] += rng.normal(0.0, cfg.position_step, size=(len(local), 2))
        local[:, 2] += rng.normal(0.0, cfg.alpha_step, size=len(local))
        children[:len(local)] = local
        return self.project(children)


def _leader(fit: np.ndarray, pred: np.ndarray, label: int) -> int:
    """Index of the most confident misclassified candidate, else of the lowest true-class probability."""
    wins = np.flatnonzero(pred != label)
    return int(wins[np.argmin(fit[wins])]) if len(wins) else int(np.argmin(fit))


def _hop(search: _Search, pop: np.ndarray, fit: np.ndarray, pred: np.ndarray, best: tuple) -> tuple:
    """Re-draw the worst half of ``pop`` in place (the hop to another basin); returns the new best."""
    worst = np.argsort(fit)[len(pop) // 2:]
    pop[worst] = search.draw(len(worst))
    wfit, wpred = search.evaluate(pop[worst])
    k = len(wfit)
    fit[worst[:k]], pred[worst[:k]] = wfit, wpred
    fit[worst[k:]] = np.inf
    j = _leader(fit, pred, search.label)
    if pred[j] != search.label or fit[j] < best[1]:
        return pop[j].copy(), float(fit[j]), int(pred[j])
    return best


def blackbox_search(
    predict: Callable[[Tensor], Tensor] | QueryCounter,
    image: Tensor,
    label: int,
    logo,
    allowed: np.ndarray,
    config: SearchConfig,
    scale: float = 1.0,
) -> SearchResult:
    """Search ``(x, y, alpha)`` for one image with black-box queries (module docstring).

    Args:
        predict: probabilities B×K of images B×C×H×W in [0, 1] (or a :class:`QueryCounter`).
        image: C×H×W float in [0, 1] (the original, as served to the model).
        label: true class index; success = the model predicts any other class.
        logo: RGBA ``h x w x 4`` in [0, 1]; allowed: bool ``(H-h'+1) x (W-w'+1)`` map of
            permitted top-left positions for the scaled logo (``allowed[y, x]``).
        config: :class:`SearchConfig`; scale: logo scale.

    Returns:
        :class:`SearchResult` (``queries`` counts only this call's images).

    Raises:
        ValueError: no allowed position (the lesion region leaves no room for the mark).
    """
    counter = predict if isinstance(predict, QueryCounter) else QueryCounter(predict)
    coords = np.argwhere(np.asarray(allowed, dtype=bool))  # (N, 2) rows of (y, x)
    if len(coords) == 0:
        raise ValueError("no allowed position: the lesion region leaves no room for the mark")
    search = _Search(counter, image, label, logo, coords, config, scale)
    pop = search.draw(config.population)
    fit, pred = search.evaluate(pop)
    pop = pop[:len(fit)]
    best_i = int(np.argmin(fit))
    best = (pop[best_i].copy(), float(fit[best_i]), int(pred[best_i]))
    stale = 0
    for _gen in range(config.generations):
        if best[2] != label or search.used() >= config.query_budget:
            break
        children = search.children(pop, best[0])
        cfit, cpred = search.evaluate(children)
        m = len(cfit)
        better = cfit < fit[:m]
        pop[:m][better], fit[:m][better], pred[:m][better] = children[:m][better], cfit[better], cpred[better]
        i = _leader(fit, pred, label)  # any misclassified candidate ends the search
        if fit[i] < best[1] - 1e-6 or pred[i] != label:
            best, stale = (pop[i].copy(), float(fit[i]), int(pred[i])), 0
        else:
            stale += 1
        if stale >= config.patience:
            best, stale = _hop(search, pop, fit, pred, best), 0
    p, f, c = best
    return SearchResult(x=int(p[1]), y=int(p[0]), alpha=float(p[2]), success=c != label,
                        queries=search.used(), true_prob=f, predicted=c)
