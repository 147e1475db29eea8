"""Retrieve / Rank / Recommend on a live server equal the packaged bundle called directly."""

from __future__ import annotations

import numpy as np
import pytest

from recship.runtime.client import Query

pytestmark = pytest.mark.integration

ATOL = 1e-5


def test_retrieve_returns_the_packaged_top_k(client, reference, make_user) -> None:
    users = [make_user(u) for u in (0, 17, 299)]
    response = client.retrieve("movies", [Query(u) for u in users], top_k=10)
    scores, ids = reference.retrieve(users, 10)
    assert response.served_by.bundle == "movies" and response.served_by.version == 1
    assert response.served_by.release_id
    assert len(response.results) == 3
    for result, row_scores, row_ids in zip(response.results, scores, ids, strict=True):
        assert [item.item_id for item in result] == row_ids.tolist()
        np.testing.assert_allclose([item.score for item in result], row_scores, atol=ATOL)


def test_a_retrieve_request_larger_than_a_batch_is_split_by_queries(
    client, reference, make_user
) -> None:
    # 600 queries make three parts of the session server's 256-row batches; users with and
    # without stored features (some send only their key) make the parts' cuts fall at
    # different offsets.
    queries = []
    for position in range(600):
        features = make_user(position % 300)
        if position % 3 == 0:
            features = {"user_id": features["user_id"]}
        queries.append(Query(features))
    whole = client.retrieve("movies", queries, top_k=5)
    assert len(whole.results) == 600
    for position in (0, 1, 2, 255, 256, 257, 511, 512, 599):
        alone = client.retrieve("movies", [queries[position]], top_k=5)
        assert [i.item_id for i in whole.results[position]] == [i.item_id for i in alone.results[0]]
    _, ids = reference.retrieve([make_user(1)], 5)
    assert [item.item_id for item in whole.results[1]] == ids[0].tolist()


def test_rank_scores_equal_the_packaged_ranker(client, reference, make_user) -> None:
    queries = [Query(make_user(5)), Query(make_user(42, 1.5))]
    candidates = [list(reference.item_ids([0, 7, 199, 7])), list(reference.item_ids([3]))]
    response = client.rank("movies", queries, candidates)
    assert len(response.results) == 2
    np.testing.assert_allclose(
        response.results[0], reference.rank(make_user(5), candidates[0]), atol=ATOL
    )
    np.testing.assert_allclose(
        response.results[1], reference.rank(make_user(42, 1.5), candidates[1]), atol=ATOL
    )
    assert response.results[0][1] == pytest.approx(response.results[0][3])


def test_recommend_is_retrieve_then_rank_with_exclusions(client, reference, make_user) -> None:
    features = make_user(11)
    _, ids = reference.retrieve([features], 35)
    excluded = ids[0][:5].tolist()
    response = client.recommend(
        "movies", [Query(features)], retrieve_k=30, top_n=8, exclude=[excluded]
    )
    items = response.results[0]
    assert len(items) == 8
    # Retrieval skips the excluded ids: the 30 candidates are the best 30 of the others.
    kept = [i for i in ids[0].tolist() if i not in excluded]
    assert len(kept) == 30
    probabilities = reference.rank(features, kept)
    order = np.argsort(-probabilities, kind="stable")[:8]
    assert [item.item_id for item in items] == [kept[j] for j in order]
    np.testing.assert_allclose([i.rank_score for i in items], probabilities[order], atol=ATOL)
    scores, found = reference.retrieve([features], 35)
    by_id = dict(zip(found[0].tolist(), scores[0].tolist(), strict=True))
    for item in items:
        assert item.item_id not in excluded
        assert item.retrieval_score == pytest.approx(by_id[item.item_id], abs=ATOL)
    assert [i.rank_score for i in items] == sorted((i.rank_score for i in items), reverse=True)


def test_exclusions_still_fill_top_n_and_fewer_only_past_the_catalogue(
    client, reference, make_user
) -> None:
    features = make_user(3)
    _, ids = reference.retrieve([features], 200)  # the session bundle has 200 items
    response = client.recommend(
        "movies", [Query(features)], retrieve_k=4, top_n=4, exclude=[ids[0][:3].tolist()]
    )
    assert len(response.results[0]) == 4
    assert not {item.item_id for item in response.results[0]} & set(ids[0][:3].tolist())
    # Excluding all but two items of the catalogue leaves two to return.
    leave = ids[0][:198].tolist()
    response = client.recommend("movies", [Query(features)], 10, 10, exclude=[leave])
    assert sorted(item.item_id for item in response.results[0]) == sorted(ids[0][198:].tolist())
    retrieved = client.retrieve("movies", [Query(features)], 10, exclude=[leave])
    assert [item.item_id for item in retrieved.results[0]] == ids[0][198:].tolist()


def test_retrieve_with_exclusions_is_the_exact_top_k_of_the_other_items(
    client, reference, make_user
) -> None:
    users = [make_user(u) for u in (5, 6, 7)]
    _, ids = reference.retrieve(users, 60)
    exclude = [ids[0][:50].tolist(), [], ids[2][::2].tolist()]
    response = client.retrieve("movies", [Query(u) for u in users], 10, exclude=exclude)
    for row, (result, banned) in enumerate(zip(response.results, exclude, strict=True)):
        expected = [i for i in ids[row].tolist() if i not in banned][:10]
        assert [item.item_id for item in result] == expected


def test_version_and_label_select_the_same_release(client, admin, make_user) -> None:
    admin.set_label("movies", "stable", 1)
    features = make_user(1)
    first = client.retrieve("movies", [Query(features)], 3, version=1)
    second = client.retrieve("movies", [Query(features)], 3, label="stable")
    assert first == second
    assert first.served_by.version == 1


def test_a_rank_request_larger_than_a_batch_is_split_not_rejected(
    client, reference, make_user
) -> None:
    # The session server batches at most 256 rows; 600 candidates make three parts.
    candidates = list(reference.item_ids([i % 200 for i in range(600)]))
    response = client.rank("movies", [Query(make_user(9))], [candidates])
    expected = reference.rank(make_user(9), candidates)
    np.testing.assert_allclose(response.results[0], expected, atol=ATOL)


def test_a_stored_user_needs_only_its_key(client, reference, make_user) -> None:
    # User 40's stored features (from the training data) stand in for what it does not send.
    stored = reference.transforms.features
    features = make_user(40)
    alone = client.recommend("movies", [{"user_id": features["user_id"]}], 20, 5)
    assert alone.cold_start == [False]
    assert len(alone.results[0]) == 5
    # A value the query sends overrides the stored one.
    key = features["user_id"]
    first, second = (
        client.retrieve("movies", [{"user_id": key, "user_occupation": occupation}], 5)
        for occupation in ("occupation_000", "occupation_001")
    )
    assert [i.score for i in first.results[0]] != [i.score for i in second.results[0]]
    assert set(stored) >= {"user_id", "user_occupation"}


def test_an_unknown_user_is_a_cold_start_with_the_fitted_defaults(client, make_user) -> None:
    response = client.recommend("movies", [{"user_id": "nobody"}, make_user(3)], 20, 5)
    assert response.cold_start == [True, False]
    assert len(response.results[0]) == 5
