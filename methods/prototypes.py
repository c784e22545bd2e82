"""Streaming token-prototype statistics for SPT's prompt initialisation (spec methods.md §3.3, §3.10).

SPT initialises each prompted layer's M prompt vectors from the patch tokens (CLS removed) that the
frozen, prompt-free model produces at that layer's input on the downstream training images. The
reference stacks every image's hidden states in memory; here every rule is a *streaming* collector
that sees the tokens one batch at a time and keeps O(M·D) state, so memory does not grow with the
training set:

* ``random``   — token sampling: a uniform M-subset of all S·P patch tokens, by reservoir sampling
  (Algorithm R). Its decisions depend only on each item's position in the stream and a seeded
  PCG64 stream, so batches of 3 and one batch of everything select the same items.
* ``mean_pool`` / ``max_pool`` — per image, the P tokens are pooled over M windows
  (``pool_windows``), giving S·M pooled vectors; M of them are picked uniformly at random, again by
  reservoir sampling over the stream of pooled vectors.
* ``kmeans``   — mini-batch k-means (Sculley 2010): centres start from k-means++ seeding on the
  first >= 3·M tokens seen, every batch assigns its tokens to the nearest centre and moves each centre to
  the running mean of all tokens ever assigned to it.

Every collector has ``update(tokens [B, P, D])`` and ``result() -> Prototypes``; ``source_index``
records which stream items were selected (pooled-vector index ``image * M + window`` for pooling,
``image * P + token`` for random), so tests can recompute the expected prompts independently.

``ReferenceSampler`` (SPT's ``init_sampling: reference``) is the reference's own row choice instead: over
the S images it sampled with replacement, it flattens the S·P tokens image-major (``random``) or the S·M
pooled vectors window-major (``mean_pool`` / ``max_pool``: the reference stacks windows first), draws
one ``torch.rand`` per row from the given generator and keeps the rows of the M smallest values
(``argsort(rand)[:M]``); it still streams, keeping only the chosen rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

INIT_RULES = ("random", "mean_pool", "max_pool", "kmeans")


@dataclass
class Prototypes:
    """M init vectors [M, D] for one layer, and the stream indices they came from (None for k-means)."""

    vectors: torch.Tensor
    source_index: Optional[torch.Tensor]
    items_seen: int


def pool_windows(num_tokens: int, m: int) -> list[list[int]]:
    """The reference's M pooling windows over P = ``num_tokens`` tokens.

    w = floor(P / (M-1)), r = P mod w; windows [k·w, (k+1)·w) for k = 0..M-2, then the last r
    tokens, or the whole sequence when r = 0 (M=20, P=196 -> w=10, r=6). Two cases the reference
    cannot handle are defined here: M = 1 gives one window over the whole sequence; when M-1 > P
    (w would be 0) w is 1 and window indices wrap modulo P.
    """
    p = num_tokens
    if m < 1 or p < 1:
        raise ValueError(f"pool_windows needs M >= 1 and P >= 1 (got M={m}, P={p})")
    if m == 1:
        return [list(range(p))]
    w = max(1, p // (m - 1))
    windows = [[(k * w + j) % p for j in range(w)] for k in range(m - 1)]
    r = p % w
    windows.append(list(range(p - r, p)) if r else list(range(p)))
    return windows


def pool_tokens(tokens: torch.Tensor, m: int, mode: str) -> torch.Tensor:
    """Pool each image's tokens [B, P, D] over ``pool_windows(P, M)`` -> [B, M, D] (``mean`` or ``max``)."""
    if mode not in ("mean", "max"):
        raise ValueError(f"pool mode must be mean or max (got {mode})")
    windows = pool_windows(tokens.shape[1], m)
    out = []
    head = windows[:-1]
    if head:  # the first M-1 windows all have w tokens: one gather
        idx = torch.tensor(head, device=tokens.device)  # [M-1, w]
        g = tokens[:, idx]  # [B, M-1, w, D]
        out.append(g.mean(2) if mode == "mean" else g.amax(2))
    last = tokens[:, windows[-1]]
    out.append((last.mean(1) if mode == "mean" else last.amax(1)).unsqueeze(1))
    return torch.cat(out, dim=1)


class Reservoir:
    """Uniform sample of ``k`` items from a stream of vectors (Algorithm R), seeded and batch-invariant.

    Item t (0-based) fills slot t while t < k; afterwards it draws u_t from a PCG64 stream and, if
    j = floor(u_t·(t+1)) < k, replaces slot j. One u per item in stream order, so the result does
    not depend on how the stream is cut into batches. With fewer than k items in total, ``result``
    repeats the items it has cyclically (documented rule; only reachable with tiny data).
    """

    def __init__(self, k: int, seed: int):
        self.k = k
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.buf: Optional[torch.Tensor] = None
        self.index = torch.full((k,), -1, dtype=torch.long)
        self.seen = 0

    def update(self, items: torch.Tensor) -> None:
        """Feed items [N, D] (stream order)."""
        items = items.detach()
        n = items.shape[0]
        if self.buf is None:
            self.buf = torch.zeros(self.k, items.shape[1], dtype=torch.float32, device=items.device)
        start = self.seen
        fill = max(0, min(n, self.k - start))
        if fill:
            self.buf[start : start + fill] = items[:fill].float()
            self.index[start : start + fill] = torch.arange(start, start + fill)
        rest = n - fill
        if rest:
            t = np.arange(start + fill, start + n, dtype=np.float64)
            j = np.floor(self.rng.random(rest) * (t + 1)).astype(np.int64)
            for pos in np.nonzero(j < self.k)[0]:  # in stream order: later items win a shared slot
                slot = int(j[pos])
                self.buf[slot] = items[fill + pos].float()
                self.index[slot] = int(t[pos])
        self.seen += n

    def result(self) -> Prototypes:
        if self.seen == 0 or self.buf is None:
            raise ValueError("no items were seen: the training loader is empty")
        have = min(self.seen, self.k)
        order = torch.arange(self.k) % have
        return Prototypes(self.buf[order].clone(), self.index[order].clone(), self.seen)


class TokenSampler:
    """``random``: reservoir over all patch tokens of all images."""

    def __init__(self, m: int, seed: int):
        self.res = Reservoir(m, seed)

    def update(self, tokens: torch.Tensor) -> None:
        self.res.update(tokens.reshape(-1, tokens.shape[-1]))

    def result(self) -> Prototypes:
        return self.res.result()


class PooledSampler:
    """``mean_pool`` / ``max_pool``: per-image window pooling, then a reservoir over the pooled vectors."""

    def __init__(self, m: int, seed: int, mode: str):
        self.m, self.mode = m, mode
        self.res = Reservoir(m, seed)

    def update(self, tokens: torch.Tensor) -> None:
        pooled = pool_tokens(tokens, self.m, self.mode)  # [B, M, D]
        self.res.update(pooled.reshape(-1, pooled.shape[-1]))

    def result(self) -> Prototypes:
        return self.res.result()


class StreamingKMeans:
    """``kmeans``: mini-batch k-means with per-centre counts (each centre = mean of its assigned tokens)."""

    def __init__(self, m: int, seed: int):
        self.m = m
        self.init_size = 3 * m  # tokens buffered for the k-means++ seeding (as scikit-learn's init_size)
        self.gen = torch.Generator().manual_seed(seed)
        self.centres: Optional[torch.Tensor] = None
        self.counts: Optional[torch.Tensor] = None
        self.pending: list[torch.Tensor] = []
        self.seen = 0

    def _start(self, x: torch.Tensor) -> None:
        """k-means++ seeding on the first buffered tokens (cycling through them when fewer than M)."""
        n = x.shape[0]
        first = int(torch.randint(n, (1,), generator=self.gen))
        picks = [first]
        d2 = ((x - x[first]) ** 2).sum(1)
        for _ in range(1, min(self.m, n)):
            total = float(d2.sum())
            if total <= 0:  # every remaining token coincides with a centre
                break
            nxt = int(torch.multinomial((d2 / total).cpu(), 1, generator=self.gen))
            picks.append(nxt)
            d2 = torch.minimum(d2, ((x - x[nxt]) ** 2).sum(1))
        pick = torch.tensor(picks)[torch.arange(self.m) % len(picks)]
        self.centres = x[pick.to(x.device)].clone()
        self.counts = torch.zeros(self.m, dtype=torch.float64, device=x.device)

    def update(self, tokens: torch.Tensor) -> None:
        x = tokens.detach().reshape(-1, tokens.shape[-1]).float()
        self.seen += x.shape[0]
        if self.centres is None:
            self.pending.append(x)
            if sum(p.shape[0] for p in self.pending) < self.init_size:
                return
            x = torch.cat(self.pending)
            self.pending = []
            self._start(x)
        self._step(x)

    def _step(self, x: torch.Tensor) -> None:
        assign = torch.cdist(x, self.centres).argmin(dim=1)
        n = torch.bincount(assign, minlength=self.m).to(self.counts.dtype)
        sums = torch.zeros_like(self.centres).index_add_(0, assign, x)
        self.counts += n
        hit = n > 0
        c = self.centres[hit]
        self.centres[hit] = c + (sums[hit] - n[hit, None].to(c.dtype) * c) / self.counts[hit, None].to(c.dtype)

    def result(self) -> Prototypes:
        if self.centres is None:
            if not self.pending:
                raise ValueError("no items were seen: the training loader is empty")
            x = torch.cat(self.pending)  # fewer tokens than M in total: centres cycle through them
            self.pending = []
            self._start(x)
            self._step(x)
        return Prototypes(self.centres.clone(), None, self.seen)


class ReferenceSampler:
    """The reference's ``argsort(torch.rand(rows))[:M]`` row choice over ``n_images`` images in stream order.

    The row noise is drawn from ``generator`` at the first ``update`` (when the rows are known), so layers
    updated in order draw in the reference's order (all after the image indices)."""

    def __init__(self, rule: str, m: int, n_images: int, generator: torch.Generator):
        if rule not in ("random", "mean_pool", "max_pool"):
            raise ValueError(f"reference sampling covers random, mean_pool and max_pool (got {rule})")
        self.rule, self.m, self.n_images, self.gen = rule, m, n_images, generator
        self.keep: Optional[torch.Tensor] = None
        self.vectors: Optional[torch.Tensor] = None
        self.seen = 0

    def update(self, tokens: torch.Tensor) -> None:
        """Feed the next images' tokens [b, P, D] (images in sample order)."""
        tokens = tokens.detach().float()
        b, p, d = tokens.shape
        S = self.n_images
        if self.keep is None:
            rows = S * (p if self.rule == "random" else self.m)
            self.keep = torch.argsort(torch.rand(rows, generator=self.gen))[: self.m]
            self.vectors = torch.zeros(len(self.keep), d, device=tokens.device)
        if self.rule == "random":  # row = image * P + token
            image, item, items = self.keep // p, self.keep % p, tokens
        else:  # row = window * S + image
            image, item = self.keep % S, self.keep // S
            items = pool_tokens(tokens, self.m, "mean" if self.rule == "mean_pool" else "max")
        here = (image >= self.seen) & (image < self.seen + b)
        for slot in here.nonzero().flatten().tolist():
            self.vectors[slot] = items[int(image[slot]) - self.seen, int(item[slot])]
        self.seen += b

    def result(self) -> Prototypes:
        if self.keep is None or self.seen < self.n_images:
            raise ValueError(f"{self.seen} of the {self.n_images} sampled images were seen")
        order = torch.arange(self.m) % len(self.keep)  # fewer rows than M: repeat them (the reference fails)
        return Prototypes(self.vectors[order].clone(), self.keep[order].clone(), self.seen)


def make_collector(rule: str, m: int, seed: int):
    """The streaming collector for one layer and init ``rule`` (one of ``INIT_RULES``)."""
    if rule == "random":
        return TokenSampler(m, seed)
    if rule == "mean_pool":
        return PooledSampler(m, seed, "mean")
    if rule == "max_pool":
        return PooledSampler(m, seed, "max")
    if rule == "kmeans":
        return StreamingKMeans(m, seed)
    raise ValueError(f"unknown prototype rule '{rule}' (valid: {', '.join(INIT_RULES)})")
