"""Ranking examples drawn from the distribution the ranker serves: interactions vs. candidates.

Why: served, the ranker orders the retrieval model's top-K candidates of a user, items the user
has mostly never interacted with. Trained only on the pairs a user rated (label rating >= 4) it
learns "liked, given watched" and pushes rarely watched, highly rated items to the top of
every candidate list; on ML-100K that made the top 10 ~40 % worse than retrieval alone. So for
interaction data (MovieLens formats, synthetic) the examples of an epoch are

- positives (label 1): every training interaction of the user;
- hard negatives (label 0): per positive, `hard_negatives` items drawn uniformly from the
  user's top `mine_k` retrieval candidates (the retrieval model's exact inner-product top K,
  the user's training items excluded: what the ranker sees when served);
- random negatives (label 0): per positive, `random_negatives` items drawn uniformly from the
  catalogue items the user has no training interaction with (so items retrieval rarely brings
  still score low when a larger K brings them).

Positives are weighted by their explicit rating divided by the mean training rating (when the
source has ratings and `rating_weighted`): every interaction is a positive, the way Recommend is
judged, but a 5-star one counts more than a 1-star one. Negatives weigh 1.

Only the training split is used: candidates exclude the user's training items and nothing
else, so a held-out item can be drawn as a negative exactly as often as any other unseen item
(the sampler never sees held-out data; the rare collision is the honest "future positive looks
negative" of real logs). Negatives are redrawn every epoch from a generator seeded by
(seed, epoch), so a resumed run and every rank build the same examples.

Called by `recship.trainer.train` (one call per epoch on every rank) and by the tests; imports
only numpy, torch and the data modules.

Example::

    candidates = mine_candidates(user_vectors, item_vectors, train, k=200)
    examples = build_examples(train, ExampleRecipe(2, 8), candidates, epoch=0, seed=0)
    batches = example_batches(train, examples, 256, rank=0, world_size=2, epoch=0)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from recship.base.errors import InvalidInput
from recship.trainer.data.dataset import InteractionDataset

#: Scores per block while mining (users x items float64 values held at once).
_SCORES_PER_BLOCK = 1 << 22


@dataclass(frozen=True)
class ExampleRecipe:
    """How many negatives each positive brings, and from where.

    Attributes:
        hard_negatives: per positive, items drawn from the user's retrieval candidates
            (needs candidates; 0 without a retrieval model).
        random_negatives: per positive, items drawn uniformly from the catalogue items the
            user has not interacted with in training.
        rating_weighted: weight each positive by rating / mean training rating (sources
            without ratings: weight 1).
    """

    hard_negatives: int
    random_negatives: int
    rating_weighted: bool = True

    def __post_init__(self) -> None:
        if self.hard_negatives < 0 or self.random_negatives < 0:
            raise InvalidInput(
                f"negatives per positive must be >= 0, got hard {self.hard_negatives}, "
                f"random {self.random_negatives}"
            )
        if self.hard_negatives + self.random_negatives == 0:
            raise InvalidInput("a ranking recipe needs at least one negative per positive")

    @property
    def examples_per_positive(self) -> int:
        """The positive and its negatives."""
        return 1 + self.hard_negatives + self.random_negatives


@dataclass(frozen=True)
class RankingExamples:
    """One epoch of (user, item, label) ranking examples; positives first, then negatives.

    Attributes:
        user_ids: int64 [N].
        item_ids: int64 [N].
        labels: float32 [N] in {0, 1}.
        weights: float32 [N] loss weights (mean 1 over the positives; 1 for negatives).
    """

    user_ids: np.ndarray
    item_ids: np.ndarray
    labels: np.ndarray
    weights: np.ndarray

    def __len__(self) -> int:
        return int(self.user_ids.size)


def _seen_keys(train: InteractionDataset) -> np.ndarray:
    """Sorted unique user * num_items + item keys of the training interactions."""
    return np.unique(train.user_ids * np.int64(train.num_items) + train.item_ids)


@torch.no_grad()
def mine_candidates(
    user_embeddings: torch.Tensor | np.ndarray,
    item_embeddings: torch.Tensor | np.ndarray,
    train: InteractionDataset,
    k: int,
) -> np.ndarray:
    """Every user's exact inner-product top `k` items, the user's training items excluded.

    This is the candidate list a served retrieval model hands the ranker (Recommend drops the
    items a client excludes, usually what the user already has). Scores are float64 and ties
    go to the lower item id, so every rank computes the same lists.

    Args:
        user_embeddings: float [num_users, D], row = user id.
        item_embeddings: float [num_items, D], row = item id.
        train: the training split (only its interactions are excluded; nothing held out is
            read).
        k: candidates per user (capped at the number of items).

    Returns:
        int64 [num_users, k] item ids, best first; -1 pads users with fewer than k unseen
        items.

    Raises:
        InvalidInput: on k < 1 or embeddings that do not match the data set's sizes.
    """
    users = torch.as_tensor(user_embeddings).double()
    items = torch.as_tensor(item_embeddings).double()
    if k < 1:
        raise InvalidInput(f"mining k must be >= 1, got {k}")
    if users.shape[0] != train.num_users or items.shape[0] != train.num_items:
        raise InvalidInput(
            f"embeddings [{users.shape[0]}, {items.shape[0]}] do not match the data set's "
            f"{train.num_users} users and {train.num_items} items"
        )
    k = min(k, train.num_items)
    seen = _seen_keys(train)
    seen_users, seen_items = np.divmod(seen, train.num_items)
    out = np.full((train.num_users, k), -1, dtype=np.int64)
    block = max(1, _SCORES_PER_BLOCK // max(train.num_items, 1))
    # Tie-break by item id: a tiny decreasing offset would change scores, so sort instead.
    for start in range(0, train.num_users, block):
        stop = min(start + block, train.num_users)
        scores = users[start:stop] @ items.T
        lo, hi = np.searchsorted(seen_users, [start, stop])
        scores[
            torch.from_numpy(seen_users[lo:hi] - start), torch.from_numpy(seen_items[lo:hi])
        ] = -torch.inf
        values = scores.numpy()
        # Stable sort of the negated scores: best first, equal scores by ascending item id.
        order = np.argsort(-values, axis=1, kind="stable")[:, :k]
        valid = np.isfinite(np.take_along_axis(values, order, axis=1))
        out[start:stop] = np.where(valid, order, -1)
    return out


def build_examples(
    train: InteractionDataset,
    recipe: ExampleRecipe,
    candidates: np.ndarray | None,
    *,
    epoch: int,
    seed: int,
) -> RankingExamples:
    """The ranking examples of one epoch (see the module doc).

    Args:
        train: the training split: its interactions are the positives and are never drawn as
            negatives.
        recipe: negatives per positive.
        candidates: int64 [num_users, K] from `mine_candidates` (-1 padded), or None when no
            retrieval model is given (then `recipe.hard_negatives` must be 0).
        epoch: with `seed`, picks the draws (so each epoch sees other negatives).
        seed: the run's seed.

    Returns:
        len(train) * recipe.examples_per_positive examples, except that a user with no unseen
        item gets no negatives (none exist) and one whose candidate list is empty gets random
        negatives in place of hard ones.

    Raises:
        InvalidInput: hard negatives asked for without candidates, or candidates of the wrong
            shape.
    """
    if recipe.hard_negatives and candidates is None:
        raise InvalidInput("hard negatives need retrieval candidates (train with --retrieval)")
    if candidates is not None and (candidates.ndim != 2 or candidates.shape[0] != train.num_users):
        raise InvalidInput(
            f"candidates must be [{train.num_users}, K], got {list(candidates.shape)}"
        )
    rng = np.random.default_rng([seed, epoch, 0x5EED])
    num_items = train.num_items
    seen = _seen_keys(train)
    seen_users = seen // num_items
    seen_count = np.bincount(seen_users, minlength=train.num_users)
    positive_users = train.user_ids
    # A user who has seen every item has no negative to draw.
    has_unseen = seen_count[positive_users] < num_items
    anchors = positive_users[has_unseen]

    hard_users = np.repeat(anchors, recipe.hard_negatives)
    random_users = np.repeat(anchors, recipe.random_negatives)
    hard_items = np.empty(0, dtype=np.int64)
    if hard_users.size and candidates is not None:
        available = (candidates >= 0).sum(axis=1)
        draw = np.floor(rng.random(hard_users.size) * available[hard_users]).astype(np.int64)
        usable = available[hard_users] > 0
        hard_items = candidates[hard_users, np.minimum(draw, candidates.shape[1] - 1)]
        # No candidate at all (every item seen but a few): a random unseen item instead.
        hard_items = np.where(usable, hard_items, -1)
    random_items = _unseen_items(seen, seen_count, num_items, random_users, rng)
    if hard_items.size and np.any(hard_items < 0):
        missing = hard_items < 0
        hard_items[missing] = _unseen_items(seen, seen_count, num_items, hard_users[missing], rng)
    user_ids = np.concatenate([positive_users, hard_users, random_users])
    item_ids = np.concatenate([train.item_ids, hard_items, random_items])
    negatives = hard_users.size + random_users.size
    labels = np.concatenate(
        [np.ones(positive_users.size, dtype=np.float32), np.zeros(negatives, dtype=np.float32)]
    )
    weights = np.concatenate(
        [positive_weights(train, recipe.rating_weighted), np.ones(negatives, dtype=np.float32)]
    )
    return RankingExamples(user_ids=user_ids, item_ids=item_ids, labels=labels, weights=weights)


def positive_weights(train: InteractionDataset, rating_weighted: bool) -> np.ndarray:
    """float32 [len(train)]: rating / mean rating per interaction, or ones.

    Ones when not `rating_weighted`, when the source has no ratings, or when the ratings are
    not all positive (a weight must not flip a positive into a negative).
    """
    ratings = train.ratings
    if not rating_weighted or ratings is None or ratings.size == 0 or ratings.min() <= 0:
        return np.ones(len(train), dtype=np.float32)
    return (ratings / ratings.mean()).astype(np.float32)


def _unseen_items(
    seen: np.ndarray,
    seen_count: np.ndarray,
    num_items: int,
    users: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """One item per entry of `users`, uniform over the items that user has not seen.

    Exact, no rejection loop: draw r uniform in [0, num_items - seen), and return the r-th
    unseen item, x = r + #{seen items s_j of the user with s_j - j <= r} (s_j sorted, j its
    position), found by one global searchsorted over per-user offset keys.

    Args:
        seen: sorted user * num_items + item keys of the training interactions.
        seen_count: int [num_users] distinct training items per user.
        num_items: catalogue size.
        users: int64 [M] users to draw for (each with at least one unseen item).
        rng: the epoch's generator.

    Returns:
        int64 [M] item ids.
    """
    if users.size == 0:
        return np.empty(0, dtype=np.int64)
    seen_users, seen_items = np.divmod(seen, num_items)
    starts = np.cumsum(seen_count) - seen_count
    position = np.arange(seen.size, dtype=np.int64) - starts[seen_users]
    stride = np.int64(num_items + 1)
    # Nondecreasing within a user; the user offset keeps users apart in one sorted array.
    keys = seen_users * stride + (seen_items - position)
    unseen = num_items - seen_count[users]
    r = np.floor(rng.random(users.size) * unseen).astype(np.int64)
    before = np.searchsorted(keys, users * stride + r, side="right") - starts[users]
    return r + before
