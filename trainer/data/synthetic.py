"""A seeded synthetic interaction data set with planted structure, of any size.

The generator draws what a model should be able to recover, so training on it gives measurably
better-than-random retrieval recall and ranking AUC:

- latent factors: a user's taste vector mixes factors of its age bucket, occupation and gender
  with individual noise; an item's vector mixes the factors of its genres with item noise;
- item categories: 1-3 genres per item from a skewed genre distribution (a multi-valued feature);
- popularity skew: a Zipf-like item bias, log-popularity = -popularity_exponent * log(1 + rank);
- interactions: each user picks `interactions_per_user` distinct items with probability
  proportional to exp(affinity_scale * taste . item + popularity) (Gumbel top-k sampling);
- labels: Bernoulli(sigmoid(2 * taste . item + release-era quality + age-bucket generosity)),
  centred so that about half of the interactions are positives.

The schema is the MovieLens one (same feature names), so every model runs on both.

Example::

    data = generate(num_users=500, num_items=200, interactions_per_user=10, seed=1)
"""

from __future__ import annotations

import numpy as np

from recship.base.errors import InvalidInput
from recship.base.jagged import EntityTable, JaggedColumn
from recship.trainer.data.dataset import InteractionDataset
from recship.trainer.data.movielens import (
    AGE_BUCKETS,
    ITEM_GENRES,
    ITEM_ID,
    ITEM_YEAR_BUCKET,
    USER_AGE_BUCKET,
    USER_GENDER,
    USER_ID,
    USER_OCCUPATION,
    USER_ZIP_PREFIX,
    YEAR_BUCKETS,
    ZIP_PREFIXES,
    movielens_schema,
)

NUM_GENDERS = 2
NUM_OCCUPATIONS = 21
MAX_GENRES_PER_ITEM = 3
#: Upper bound on users x items scores held in memory at once while sampling interactions.
_SCORES_PER_CHUNK = 1 << 22


def generate(
    num_users: int = 2000,
    num_items: int = 1000,
    interactions_per_user: int = 20,
    seed: int = 0,
    *,
    num_genres: int = 18,
    latent_dim: int = 16,
    popularity_exponent: float = 1.0,
    affinity_scale: float = 3.0,
) -> InteractionDataset:
    """Generate a synthetic data set; the same arguments always give the same data.

    Args:
        num_users: Number of users (>= 1).
        num_items: Number of items (>= 1).
        interactions_per_user: Distinct items each user interacts with (1..num_items).
        seed: Seed of every random draw.
        num_genres: Number of item genres (>= 1).
        latent_dim: Dimension of the planted taste / item vectors (>= 1).
        popularity_exponent: Strength of the popularity skew (0 = none).
        affinity_scale: How strongly taste drives which items a user picks (0 = not at all).

    Returns:
        num_users * interactions_per_user interactions, activity features computed on all.

    Raises:
        InvalidInput: on out-of-range arguments.
    """
    for name, value, low in (
        ("num_users", num_users, 1),
        ("num_items", num_items, 1),
        ("interactions_per_user", interactions_per_user, 1),
        ("num_genres", num_genres, 1),
        ("latent_dim", latent_dim, 1),
    ):
        if int(value) != value or value < low:
            raise InvalidInput(f"synthetic data: {name} must be an integer >= {low}, got {value}")
    if interactions_per_user > num_items:
        raise InvalidInput(
            f"synthetic data: interactions_per_user ({interactions_per_user}) must not exceed "
            f"num_items ({num_items})"
        )
    if popularity_exponent < 0 or affinity_scale < 0:
        raise InvalidInput("synthetic data: popularity_exponent and affinity_scale must be >= 0")
    rng = np.random.default_rng(seed)
    d = latent_dim

    # Users: attributes, and taste vectors partly explained by them.
    age = rng.integers(0, len(AGE_BUCKETS), num_users)
    gender = rng.integers(0, NUM_GENDERS, num_users)
    occupation = rng.integers(0, NUM_OCCUPATIONS, num_users)
    zip_code = rng.integers(0, len(ZIP_PREFIXES), num_users)
    taste = (
        0.7 * rng.normal(size=(len(AGE_BUCKETS), d))[age]
        + 0.7 * rng.normal(size=(NUM_OCCUPATIONS, d))[occupation]
        + 0.3 * rng.normal(size=(NUM_GENDERS, d))[gender]
        + rng.normal(size=(num_users, d))
    )

    # Items: 1-3 genres from a skewed genre distribution, vectors built from genre factors.
    genre_logp = -0.7 * np.log1p(np.arange(num_genres))
    gumbel = rng.gumbel(size=(num_items, num_genres))
    ranked_genres = np.argsort(-(genre_logp + gumbel), axis=1)[:, :MAX_GENRES_PER_ITEM]
    genre_count = np.minimum(1 + rng.binomial(MAX_GENRES_PER_ITEM - 1, 0.3, num_items), num_genres)
    genre_bags = [np.sort(ranked_genres[i, : genre_count[i]]) for i in range(num_items)]
    membership = np.zeros((num_items, num_genres))
    for i, bag in enumerate(genre_bags):
        membership[i, bag] = 1.0 / bag.size
    item_vectors = membership @ rng.normal(size=(num_genres, d)) + 0.7 * rng.normal(
        size=(num_items, d)
    )
    year = rng.integers(1, len(YEAR_BUCKETS), num_items)
    popularity = -popularity_exponent * np.log1p(rng.permutation(num_items))

    # Unit-variance dot products: standardize the columns, then scale by d ** -0.25.
    taste = _standardize(taste) * d**-0.25
    item_vectors = _standardize(item_vectors) * d**-0.25

    # Interactions: Gumbel top-k over exp(affinity_scale * taste . item + popularity).
    k = interactions_per_user
    chosen = np.empty((num_users, k), dtype=np.int64)
    affinity = np.empty((num_users, k))
    chunk = max(1, _SCORES_PER_CHUNK // num_items)
    for start in range(0, num_users, chunk):
        scores = taste[start : start + chunk] @ item_vectors.T
        noisy = affinity_scale * scores + popularity + rng.gumbel(size=scores.shape)
        top = np.argpartition(-noisy, k - 1, axis=1)[:, :k]
        chosen[start : start + chunk] = top
        affinity[start : start + chunk] = np.take_along_axis(scores, top, axis=1)
    user_ids = np.repeat(np.arange(num_users, dtype=np.int64), k)
    item_ids = chosen.reshape(-1)

    # Labels: taste match, release-era quality and age-bucket generosity, centred at 50%.
    era_quality = rng.normal(0.0, 0.5, len(YEAR_BUCKETS))
    generosity = rng.normal(0.0, 0.5, len(AGE_BUCKETS))
    logits = 2.0 * affinity.reshape(-1) + era_quality[year[item_ids]] + generosity[age[user_ids]]
    logits -= np.median(logits)
    labels = (rng.random(logits.size) < 1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
    timestamps = 1_700_000_000 + rng.integers(0, 365 * 86_400, logits.size)

    users = EntityTable(
        num_rows=num_users,
        sparse={
            USER_ID: JaggedColumn.single(np.arange(num_users)),
            USER_AGE_BUCKET: JaggedColumn.single(age),
            USER_GENDER: JaggedColumn.single(gender),
            USER_OCCUPATION: JaggedColumn.single(occupation),
            USER_ZIP_PREFIX: JaggedColumn.single(zip_code),
        },
        dense=np.zeros((num_users, 1), dtype=np.float32),
    )
    items = EntityTable(
        num_rows=num_items,
        sparse={
            ITEM_ID: JaggedColumn.single(np.arange(num_items)),
            ITEM_GENRES: JaggedColumn.from_bags([bag.tolist() for bag in genre_bags]),
            ITEM_YEAR_BUCKET: JaggedColumn.single(year),
        },
        dense=np.zeros((num_items, 1), dtype=np.float32),
    )
    data = InteractionDataset(
        schema=movielens_schema(
            "synthetic", num_users, num_items, NUM_GENDERS, NUM_OCCUPATIONS, num_genres
        ),
        users=users,
        items=items,
        user_ids=user_ids,
        item_ids=item_ids,
        labels=labels,
        timestamps=timestamps,
        vocabularies={
            USER_AGE_BUCKET: [label for label, _ in AGE_BUCKETS],
            # Zero-padded so that the names sort in id order (see movielens.write_movielens).
            ITEM_GENRES: [f"genre_{g:0{len(str(num_genres - 1))}d}" for g in range(num_genres)],
            ITEM_YEAR_BUCKET: list(YEAR_BUCKETS),
        },
    )
    return data.with_activity_features()


def _standardize(x: np.ndarray) -> np.ndarray:
    """Columns shifted to mean 0 and scaled to standard deviation 1 (constant columns to 0)."""
    std = x.std(axis=0)
    return (x - x.mean(axis=0)) / np.where(std > 0, std, 1.0)
