"""A seeded synthetic interaction data set with planted structure, of any size, in O(n).

The generator draws what a model should be able to recover, so training on it gives measurably
better-than-popularity retrieval recall and better-than-random ranking AUC, without ever scoring
every user against every item (10M users x 1M items generate in minutes):

- latent neighbourhoods: items fall into `num_clusters` clusters (about sqrt(num_items)) whose
  centroids are latent vectors tied to a primary genre; an item's vector is its centroid plus
  its genres' factors and item noise;
- item categories: an item has its cluster's primary genre plus up to 2 more from a skewed
  genre distribution (a multi-valued feature);
- popularity skew: a Zipf-like item weight, (1 + rank) ** -popularity_exponent, inside each
  cluster; a cluster's mass is its items' total weight;
- taste: a user's latent taste mixes factors of its age bucket, occupation and gender with
  individual noise. Its attributes choose a few candidate clusters (the clusters its attribute
  group scores highest, computed once per group, not per user) and the user's own taste
  weighs them: P(cluster) ~ mass * exp(affinity_scale * taste . centroid);
- interactions: each user's `interactions_per_user` distinct items are drawn by choosing a
  cluster from its mixture, then an item of that cluster by popularity (per-cluster cumulative
  weights and a vectorised binary search), repeated until the items are distinct: sampling
  without replacement, O(interactions), in chunks of users;
- labels: Bernoulli(sigmoid(2 * taste . item + release-era quality + age-bucket generosity)) of
  the chosen pairs only, centred so that about half of them are positives.

Every random draw is seeded: by `seed` for the catalogue and by (seed, chunk) for each chunk of
`USERS_PER_CHUNK` users, so the same arguments give the same data on any machine.

The generator writes raw tables (`synthetic_tables`: integer ids, ages, gender and occupation
names, zip codes, "|"-separated genre names, release years, 0/1 labels, timestamps) and
`generate` encodes them through the built-in spec `specs/synthetic.toml` with `load_tables`,
like any team's own tables: the features are MovieLens's, under the same names, so every model
runs on both.

Example::

    data = generate(num_users=500, num_items=200, interactions_per_user=10, seed=1)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recship.base.errors import InvalidInput
from recship.trainer.data.builtin import synthetic_spec
from recship.trainer.data.dataset import InteractionDataset
from recship.trainer.data.tables import load_tables

NUM_GENDERS = 2
NUM_OCCUPATIONS = 21
NUM_AGE_BUCKETS = 7
NUM_ZIP_PREFIXES = 11  # ten digits and "other"
MAX_GENRES_PER_ITEM = 3
#: Raw gender and occupation values, in the id order of the spec's fixed vocabularies (they
#: sort that way): the names synthetic data has always had on the wire (`write_movielens`).
GENDERS: tuple[str, ...] = tuple(f"gender_{g}" for g in range(NUM_GENDERS))
OCCUPATIONS: tuple[str, ...] = tuple(f"occupation_{o:03d}" for o in range(NUM_OCCUPATIONS))
#: (first, last) age of each age bucket of the spec (boundaries 18, 25, 35, 45, 50, 56).
AGE_RANGES: tuple[tuple[int, int], ...] = (
    (7, 17), (18, 24), (25, 34), (35, 44), (45, 49), (50, 55), (56, 73),
)  # fmt: skip
#: Zip codes of the "other" prefix (not starting with a digit, like Canadian postcodes).
OTHER_ZIPS: tuple[str, ...] = ("T8H1N", "V3N4P", "L9G2B", "E2A4Z", "M5T3A")
#: Release years are uniform in [FIRST_YEAR, LAST_YEAR] (the spec's 5-year buckets from 1930).
FIRST_YEAR, LAST_YEAR = 1920, 2034
#: The spec's year boundaries; its bucket ids are 0 (missing), then 1 + boundaries <= year.
YEAR_BOUNDARIES = np.arange(1930, 2031, 5)
NUM_YEAR_BUCKETS = YEAR_BOUNDARIES.size + 2
TIMESTAMP_START = 1_700_000_000
TIMESTAMP_SPAN = 365 * 86_400
#: Users generated together: bounds the temporary memory, and fixes the seeding of each chunk.
USERS_PER_CHUNK = 1 << 15
#: Clusters each attribute group (age bucket x occupation x gender) may draw its items from.
CANDIDATE_CLUSTERS = 8
#: Weights of the age, occupation and gender factors in a user's taste; the rest is noise.
_AGE_WEIGHT, _OCCUPATION_WEIGHT, _GENDER_WEIGHT = 0.7, 0.7, 0.3
_NOISE_WEIGHT = 0.6
#: Rounds of cluster draws before the last items of a user are drawn uniformly.
_DRAW_ROUNDS = 8


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
    num_clusters: int | None = None,
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
        affinity_scale: How strongly taste drives which clusters a user picks (0 = not at
            all: clusters by their popularity mass only).
        num_clusters: Latent item neighbourhoods (default: about sqrt(num_items)).

    Returns:
        num_users * interactions_per_user interactions encoded through the synthetic spec,
        activity features computed on all of them.

    Raises:
        InvalidInput: on out-of-range arguments.
    """
    tables = synthetic_tables(
        num_users,
        num_items,
        interactions_per_user,
        seed,
        num_genres=num_genres,
        latent_dim=latent_dim,
        popularity_exponent=popularity_exponent,
        affinity_scale=affinity_scale,
        num_clusters=num_clusters,
    )
    return load_tables(synthetic_spec(genre_names(num_genres)), tables=tables)


def genre_names(num_genres: int) -> list[str]:
    """The genre names, zero-padded so that they sort in id order ("genre_00", ...)."""
    width = len(str(max(num_genres - 1, 0)))
    return [f"genre_{g:0{width}d}" for g in range(num_genres)]


def synthetic_tables(
    num_users: int = 2000,
    num_items: int = 1000,
    interactions_per_user: int = 20,
    seed: int = 0,
    *,
    num_genres: int = 18,
    latent_dim: int = 16,
    popularity_exponent: float = 1.0,
    affinity_scale: float = 3.0,
    num_clusters: int | None = None,
) -> dict[str, pa.Table]:
    """The raw tables `generate` encodes (arguments as `generate`'s), by spec role.

    Returns:
        {"users": user_id, age, gender, occupation, zip;
         "items": item_id, title, genres ("|"-separated names), year;
         "interactions": user_id, item_id, label (0/1), timestamp}. Raw ids are 1..n.

    Raises:
        InvalidInput: on out-of-range arguments.
    """
    clusters = _check(
        num_users,
        num_items,
        interactions_per_user,
        num_genres,
        latent_dim,
        popularity_exponent,
        affinity_scale,
        num_clusters,
    )
    world = _World.build(
        num_items, num_genres, latent_dim, popularity_exponent, affinity_scale, clusters, seed
    )
    user_parts, interaction_parts = [], []
    for chunk, start in enumerate(range(0, num_users, USERS_PER_CHUNK)):
        rng = np.random.default_rng([seed, 1, chunk])
        count = min(USERS_PER_CHUNK, num_users - start)
        users, interactions = world.users(rng, start, count, interactions_per_user)
        user_parts.append(users)
        interaction_parts.append(interactions)
    return {
        "users": pa.concat_tables(user_parts),
        "items": world.items_table(num_genres),
        "interactions": pa.concat_tables(interaction_parts),
    }


def _check(
    num_users: int,
    num_items: int,
    interactions_per_user: int,
    num_genres: int,
    latent_dim: int,
    popularity_exponent: float,
    affinity_scale: float,
    num_clusters: int | None,
) -> int:
    """Validates the arguments; returns the number of clusters."""
    for name, value, low in (
        ("num_users", num_users, 1),
        ("num_items", num_items, 1),
        ("interactions_per_user", interactions_per_user, 1),
        ("num_genres", num_genres, 1),
        ("latent_dim", latent_dim, 1),
        ("num_clusters", 1 if num_clusters is None else num_clusters, 1),
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
    if num_clusters is None:
        return max(1, round(math.sqrt(num_items)))
    return min(int(num_clusters), num_items)


@dataclass(frozen=True)
class _World:
    """The catalogue and the latent structure every chunk of users draws from (d = latent_dim,
    K clusters, N items, T candidate clusters per attribute group)."""

    age_factors: np.ndarray  # [7, d]
    occupation_factors: np.ndarray  # [21, d]
    gender_factors: np.ndarray  # [2, d]
    taste_mean: np.ndarray  # [d]: mean and std of the attribute part of a taste
    taste_std: np.ndarray  # [d]
    centroids: np.ndarray  # [K, d], scaled so that taste . centroid has unit variance
    log_mass: np.ndarray  # [K] log of each cluster's popularity mass
    candidates: np.ndarray  # [groups, T] candidate clusters of each attribute group
    order: np.ndarray  # [N] item ids sorted by cluster
    cluster_start: np.ndarray  # [K + 1] offsets of each cluster in `order`
    cumulative: np.ndarray  # [N] cumulative popularity weight along `order`
    item_vectors: np.ndarray  # [N, d] float32, scaled like the centroids
    genre_offsets: np.ndarray  # [N + 1]
    genre_values: np.ndarray  # genre ids of each item, sorted
    years: np.ndarray  # [N] release year
    era_quality: np.ndarray  # [NUM_YEAR_BUCKETS] label bonus of each year bucket
    generosity: np.ndarray  # [7] label bonus of each age bucket
    affinity: float
    num_items: int

    @classmethod
    def build(
        cls,
        num_items: int,
        num_genres: int,
        d: int,
        popularity_exponent: float,
        affinity_scale: float,
        num_clusters: int,
        seed: int,
    ) -> _World:
        rng = np.random.default_rng([seed, 0])
        scale = d**-0.25  # taste . centroid of unit-variance vectors: variance 1
        age_f = rng.normal(size=(NUM_AGE_BUCKETS, d))
        occupation_f = rng.normal(size=(NUM_OCCUPATIONS, d))
        gender_f = rng.normal(size=(NUM_GENDERS, d))
        # Attributes are uniform: the attribute part of a taste has these moments.
        mean = (
            _AGE_WEIGHT * age_f.mean(0)
            + _OCCUPATION_WEIGHT * occupation_f.mean(0)
            + _GENDER_WEIGHT * gender_f.mean(0)
        )
        var = (
            _AGE_WEIGHT**2 * age_f.var(0)
            + _OCCUPATION_WEIGHT**2 * occupation_f.var(0)
            + _GENDER_WEIGHT**2 * gender_f.var(0)
        )
        std = np.sqrt(np.maximum(var, 1e-12))

        # Genres: a skewed distribution, a latent factor each.
        genre_p = np.exp(-0.7 * np.log1p(np.arange(num_genres)))
        genre_p /= genre_p.sum()
        genre_f = rng.normal(size=(num_genres, d))

        # Clusters: a primary genre each; centroids near that genre's factor.
        k = num_clusters
        primary = np.minimum(
            np.searchsorted(np.cumsum(genre_p), rng.random(k), side="right"), num_genres - 1
        )
        centroids = _standardize(0.8 * genre_f[primary] + 0.6 * rng.normal(size=(k, d))) * scale

        # Items: balanced clusters, Zipf-like popularity, genres, vectors, years.
        cluster = rng.permutation(num_items) % k
        weight = np.power(1.0 + rng.permutation(num_items), -popularity_exponent)
        order = np.argsort(cluster, kind="stable")
        cluster_start = np.searchsorted(cluster[order], np.arange(k + 1))
        cumulative = np.cumsum(weight[order])
        mass = np.add.reduceat(weight[order], cluster_start[:-1])
        bags, keep = _item_genres(rng, primary[cluster], genre_p, num_items)
        padded = np.concatenate([genre_f, np.zeros((1, d))])  # row num_genres: no genre
        counts = keep.sum(axis=1)
        genre_mix = padded[np.where(keep, bags, num_genres)].sum(axis=1) / counts[:, None]
        genre_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        genre_values = bags[keep]
        item_vectors = (
            _standardize(
                centroids[cluster] / scale + 0.4 * genre_mix + 0.5 * rng.normal(size=(num_items, d))
            )
            * scale
        ).astype(np.float32)
        years = rng.integers(FIRST_YEAR, LAST_YEAR + 1, num_items)

        # Each attribute group's candidate clusters: the best by mass * exp(affinity * score).
        groups = np.arange(NUM_AGE_BUCKETS * NUM_OCCUPATIONS * NUM_GENDERS)
        age, occupation, gender = _group_attributes(groups)
        group_taste = (
            _AGE_WEIGHT * age_f[age]
            + _OCCUPATION_WEIGHT * occupation_f[occupation]
            + _GENDER_WEIGHT * gender_f[gender]
            - mean
        ) / std
        logits = affinity_scale * (group_taste * scale) @ centroids.T + np.log(mass)
        t = min(CANDIDATE_CLUSTERS, k)
        candidates = np.argsort(-logits, axis=1, kind="stable")[:, :t]

        return cls(
            age_factors=age_f,
            occupation_factors=occupation_f,
            gender_factors=gender_f,
            taste_mean=mean,
            taste_std=std,
            centroids=centroids,
            log_mass=np.log(mass),
            candidates=candidates,
            order=order,
            cluster_start=cluster_start,
            cumulative=cumulative,
            item_vectors=item_vectors,
            genre_offsets=genre_offsets,
            genre_values=genre_values,
            years=years,
            era_quality=rng.normal(0.0, 0.5, NUM_YEAR_BUCKETS),
            generosity=rng.normal(0.0, 0.5, NUM_AGE_BUCKETS),
            affinity=float(affinity_scale),
            num_items=num_items,
        )

    def users(
        self, rng: np.random.Generator, start: int, count: int, k: int
    ) -> tuple[pa.Table, pa.Table]:
        """Raw users start+1 .. start+count and their k interactions each."""
        d = self.centroids.shape[1]
        scale = d**-0.25
        age = rng.integers(0, NUM_AGE_BUCKETS, count)
        gender = rng.integers(0, NUM_GENDERS, count)
        occupation = rng.integers(0, NUM_OCCUPATIONS, count)
        zip_prefix = rng.integers(0, NUM_ZIP_PREFIXES, count)
        attribute_taste = (
            _AGE_WEIGHT * self.age_factors[age]
            + _OCCUPATION_WEIGHT * self.occupation_factors[occupation]
            + _GENDER_WEIGHT * self.gender_factors[gender]
            - self.taste_mean
        ) / self.taste_std
        taste = (attribute_taste + _NOISE_WEIGHT * rng.normal(size=(count, d))) * (
            scale / math.sqrt(1.0 + _NOISE_WEIGHT**2)
        )

        # The user's mixture over its group's candidate clusters, weighed by its own taste.
        candidates = self.candidates[_group_of(age, occupation, gender)]  # [count, T]
        logits = self.affinity * np.einsum("ud,utd->ut", taste, self.centroids[candidates])
        logits += self.log_mass[candidates]
        weights = np.exp(logits - logits.max(axis=1, keepdims=True))
        mixture = np.cumsum(weights, axis=1)
        mixture /= mixture[:, -1:]

        owner, items = self._distinct_items(rng, candidates, mixture, k)
        affinity = np.einsum("nd,nd->n", taste[owner], self.item_vectors[items])
        year_bucket = _year_bucket(self.years[items])
        logits = 2.0 * affinity + self.era_quality[year_bucket] + self.generosity[age[owner]]
        logits -= np.median(logits)
        labels = (rng.random(logits.size) < 1.0 / (1.0 + np.exp(-logits))).astype(np.int8)
        timestamps = TIMESTAMP_START + rng.integers(0, TIMESTAMP_SPAN, logits.size)

        ids = np.arange(start + 1, start + count + 1, dtype=np.int64)
        low = np.array([r[0] for r in AGE_RANGES])[age]
        high = np.array([r[1] for r in AGE_RANGES])[age]
        users = pa.table(
            {
                "user_id": ids,
                "age": low + (rng.random(count) * (high - low + 1)).astype(np.int64),
                "gender": pa.array(GENDERS).take(pa.array(gender)),
                "occupation": pa.array(OCCUPATIONS).take(pa.array(occupation)),
                "zip": _zip_codes(rng, zip_prefix),
            }
        )
        interactions = pa.table(
            {
                "user_id": ids[owner],
                "item_id": items.astype(np.int64) + 1,
                "label": labels,
                "timestamp": timestamps.astype(np.int64),
            }
        )
        return users, interactions

    def _distinct_items(
        self, rng: np.random.Generator, candidates: np.ndarray, mixture: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """k distinct items per user, drawn without replacement from its cluster mixture.

        Draws with replacement and keeps each user's first k distinct items (successive
        sampling: the law of drawing without replacement), drawing again, more each round, for
        the users still short; after a few rounds their last items come from the whole
        catalogue (users whose mixture sits on a cluster one item dominates).

        Returns:
            (owner, item): the user (row of `candidates`) and the item of each interaction,
            k per user, users in order, each user's items in draw order.
        """
        count = len(candidates)
        owner = np.repeat(np.arange(count), k)
        kept_owner, kept_item = _first_distinct(
            owner, self._draw(rng, candidates, mixture, owner), k
        )
        for attempt in range(1, _DRAW_ROUNDS + 3):
            missing = k - np.bincount(kept_owner, minlength=count)
            short = np.flatnonzero(missing > 0)
            if short.size == 0:
                break
            if attempt > _DRAW_ROUNDS:  # the last resort: exact, one user at a time
                kept_owner, kept_item = self._fill(rng, kept_owner, kept_item, short, missing)
                break
            owner = np.repeat(short, missing[short] * 2**attempt + 2)
            item = (
                self._draw(rng, candidates, mixture, owner)
                if attempt < _DRAW_ROUNDS
                else rng.integers(0, self.num_items, owner.size)
            )
            redrawn = np.zeros(count, dtype=bool)
            redrawn[short] = True
            again = redrawn[kept_owner]
            merged_owner, merged_item = _first_distinct(
                np.concatenate([kept_owner[again], owner]),
                np.concatenate([kept_item[again], item]),
                k,
            )
            kept_owner = np.concatenate([kept_owner[~again], merged_owner])
            kept_item = np.concatenate([kept_item[~again], merged_item])
        order = np.argsort(kept_owner, kind="stable")
        return kept_owner[order], kept_item[order]

    def _draw(
        self,
        rng: np.random.Generator,
        candidates: np.ndarray,
        mixture: np.ndarray,
        owner: np.ndarray,
    ) -> np.ndarray:
        """One item for each entry of `owner`: a cluster from its mixture, then an item."""
        pick = (mixture[owner] < rng.random(owner.size)[:, None]).sum(axis=1)
        cluster = candidates[owner, np.minimum(pick, candidates.shape[1] - 1)]
        return self._item_of(rng, cluster)

    def _fill(
        self,
        rng: np.random.Generator,
        owner: np.ndarray,
        item: np.ndarray,
        short: np.ndarray,
        missing: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Tops the short users up with random items they do not have (k near num_items)."""
        extra_owner, extra_item = [owner], [item]
        for user in short:
            rest = np.setdiff1d(rng.permutation(self.num_items), item[owner == user])
            extra = rng.permutation(rest)[: missing[user]]
            extra_owner.append(np.full(extra.size, user))
            extra_item.append(extra)
        return np.concatenate(extra_owner), np.concatenate(extra_item)

    def _item_of(self, rng: np.random.Generator, cluster: np.ndarray) -> np.ndarray:
        """An item of each given cluster, drawn by popularity: a binary search of a uniform
        point of the cluster's stretch of the cumulative weights (queries sorted first, which
        makes the search several times faster)."""
        first, stop = self.cluster_start[cluster], self.cluster_start[cluster + 1]
        low = np.where(first > 0, self.cumulative[np.maximum(first - 1, 0)], 0.0)
        high = self.cumulative[stop - 1]
        point = low + rng.random(cluster.size) * (high - low)
        by_point = np.argsort(point)
        position = np.empty_like(by_point)
        position[by_point] = np.searchsorted(self.cumulative, point[by_point])
        return self.order[np.clip(position, first, stop - 1)]

    def items_table(self, num_genres: int) -> pa.Table:
        """The raw items: ids 1..N, titles, "|"-separated genre names, release years."""
        ids = np.arange(1, self.num_items + 1, dtype=np.int64)
        names = pa.array(genre_names(num_genres)).take(pa.array(self.genre_values))
        genres = pc.binary_join(
            pa.ListArray.from_arrays(pa.array(self.genre_offsets.astype(np.int32)), names), "|"
        )
        titles = pc.binary_join_element_wise("Item ", pc.cast(pa.array(ids), pa.string()), "")
        return pa.table(
            {"item_id": ids, "title": titles, "genres": genres, "year": self.years.astype(np.int64)}
        )


def _first_distinct(owner: np.ndarray, item: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each owner's first k distinct items in draw order, owners in increasing order."""
    pairs = owner * np.int64(1 << 32) + item
    _, first = np.unique(pairs, return_index=True)
    first.sort()  # back to draw order
    owner, item = owner[first], item[first]
    order = np.argsort(owner, kind="stable")
    owner, item = owner[order], item[order]
    starts = np.searchsorted(owner, owner, side="left")
    keep = np.arange(owner.size) - starts < k
    return owner[keep], item[keep]


def _item_genres(
    rng: np.random.Generator, primary: np.ndarray, genre_p: np.ndarray, num_items: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each item's genres: its cluster's primary genre and 0-2 more drawn from the skewed genre
    distribution (a repeated draw adds nothing), sorted.

    Returns:
        (bags int [N, 3], keep bool [N, 3]): the genre ids of item i are bags[i][keep[i]].
    """
    num_genres = genre_p.size
    extra = MAX_GENRES_PER_ITEM - 1
    wanted = rng.binomial(extra, 0.3, num_items)
    drawn = np.minimum(
        np.searchsorted(np.cumsum(genre_p), rng.random((num_items, extra)), side="right"),
        num_genres - 1,
    )
    bags = np.concatenate([primary[:, None], drawn], axis=1)
    bags[:, 1:][np.arange(extra)[None, :] >= wanted[:, None]] = num_genres  # not wanted
    bags = np.sort(bags, axis=1)
    repeated = np.zeros_like(bags, dtype=bool)
    repeated[:, 1:] = bags[:, 1:] == bags[:, :-1]
    return bags, (bags < num_genres) & ~repeated


def _group_attributes(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(age bucket, occupation, gender) of each attribute group id."""
    age, rest = np.divmod(groups, NUM_OCCUPATIONS * NUM_GENDERS)
    occupation, gender = np.divmod(rest, NUM_GENDERS)
    return age, occupation, gender


def _group_of(age: np.ndarray, occupation: np.ndarray, gender: np.ndarray) -> np.ndarray:
    return (age * NUM_OCCUPATIONS + occupation) * NUM_GENDERS + gender


def _year_bucket(years: np.ndarray) -> np.ndarray:
    """The spec's year bucket ids (missing bucket 0, then boundaries 1930, 1935, ..., 2030)."""
    return 1 + np.searchsorted(YEAR_BOUNDARIES, years, side="right")


def _zip_codes(rng: np.random.Generator, prefix: np.ndarray) -> pa.Array:
    """Five-digit zip codes starting with each prefix digit; prefix 10: a non-numeric code."""
    numbers = prefix * 10_000 + rng.integers(0, 10_000, prefix.size)
    digits = pc.utf8_lpad(pc.cast(pa.array(numbers), pa.string()), 5, "0")
    other = pa.array(OTHER_ZIPS).take(pa.array(rng.integers(0, len(OTHER_ZIPS), prefix.size)))
    return pc.if_else(pa.array(prefix == NUM_ZIP_PREFIXES - 1), other, digits)


def _standardize(x: np.ndarray) -> np.ndarray:
    """Columns shifted to mean 0 and scaled to standard deviation 1 (constant columns to 0)."""
    std = x.std(axis=0)
    return (x - x.mean(axis=0)) / np.where(std > 0, std, 1.0)
