"""The protobuf contracts round-trip through JSON and binary and carry what clients need."""

from __future__ import annotations

from google.protobuf import json_format

from recship.protos.v1 import admin_pb2, manifest_pb2, recommender_pb2


def _recommend_request() -> recommender_pb2.RecommendRequest:
    request = recommender_pb2.RecommendRequest(
        model=recommender_pb2.ModelSpec(bundle="movies", label="canary"),
        retrieve_k=200,
        top_n=10,
    )
    for user in (3, 7):
        query = request.queries.add()
        features = query.query.features
        features["user_id"].int_value = user
        features["country"].string_value = "DE"
        features["liked_tags"].list_value.strings.extend(["jazz", "noir"])
        features["hours_active"].double_value = -2.5
        query.exclude_item_ids.extend(["sku-11", "sku-12"])
    return request


def _manifest() -> manifest_pb2.BundleManifest:
    manifest = manifest_pb2.BundleManifest(
        format_version=1, name="movies", version=3, release_id="4f1c", created_by="recship 0.1.0"
    )
    manifest.created_at.FromSeconds(1_790_000_000)
    manifest.sources.add(role=manifest_pb2.MODEL_ROLE_RETRIEVAL, path="/ckpt/a", step=120)
    manifest.schema.tables.add(
        name="t_user_id",
        model=manifest_pb2.MODEL_ROLE_RETRIEVAL,
        num_embeddings=943,
        embedding_dim=64,
        pooling=manifest_pb2.POOLING_TYPE_SUM,
        feature_names=["user_id"],
    )
    manifest.schema.sparse_features.add(
        name="item_genres", side=manifest_pb2.FEATURE_SIDE_ITEM, cardinality=19, multi_valued=True
    )
    manifest.quantization.add(
        table="t_user_id",
        dtype=manifest_pb2.QUANT_DTYPE_INT8,
        fp32_bytes=241408,
        packaged_bytes=64124,
    )
    manifest.sharding.device_count = 2
    manifest.sharding.placements.add(table="t_user_id", sharding_type="table_wise", ranks=[1])
    manifest.entry_points.add(
        name="query_tower",
        format=manifest_pb2.ENTRY_POINT_FORMAT_TORCHSCRIPT,
        file="query_tower.pt",
    )
    manifest.index.type = manifest_pb2.INDEX_TYPE_IVF_PQ
    manifest.index.search_params["nprobe"] = 16
    manifest.quality.passed = True
    manifest.quality.metrics["packaged/recall@10"] = 0.2431
    manifest.quality.checks.add(name="recall@10 relative loss", value=0.01, threshold=0.02)
    manifest.libraries.torch = "2.13.0+cpu"
    manifest.files.add(path="items.faiss", sha256="ab" * 32, size_bytes=123456)
    manifest.annotations["training_run"] = "nightly-42"
    return manifest


def test_recommend_request_round_trips_through_binary_and_json() -> None:
    request = _recommend_request()
    from_binary = recommender_pb2.RecommendRequest.FromString(request.SerializeToString())
    assert from_binary == request
    text = json_format.MessageToJson(request, preserving_proto_field_name=True)
    assert '"retrieve_k": 200' in text
    assert json_format.Parse(text, recommender_pb2.RecommendRequest()) == request
    assert from_binary.model.WhichOneof("version_choice") == "label"


def test_every_request_and_response_round_trips() -> None:
    messages = [
        recommender_pb2.RetrieveRequest(
            model=recommender_pb2.ModelSpec(bundle="b", version=2), top_k=5
        ),
        recommender_pb2.RankRequest(
            queries=[recommender_pb2.RankQuery(candidate_item_ids=["a", "b", "c"])]
        ),
        recommender_pb2.RecommendResponse(
            served_by=recommender_pb2.ServedBy(bundle="b", version=2, release_id="r"),
            results=[
                recommender_pb2.RecommendResult(
                    items=[
                        recommender_pb2.RecommendedItem(
                            item_id="sku-5", rank_score=0.9, retrieval_score=3.0
                        )
                    ],
                    cold_start=True,
                )
            ],
        ),
        admin_pb2.SetVersionPolicyRequest(
            bundle="b",
            policy=admin_pb2.VersionPolicy(pinned=admin_pb2.PinnedPolicy(versions=[2, 3])),
        ),
        admin_pb2.ListBundlesResponse(
            bundles=[
                admin_pb2.BundleStatus(
                    name="b",
                    versions=[
                        admin_pb2.VersionStatus(
                            version=2,
                            state=admin_pb2.VERSION_STATE_FAILED,
                            failure_reason="checksum mismatch in items.faiss",
                        )
                    ],
                )
            ]
        ),
    ]
    for message in messages:
        cls = type(message)
        assert cls.FromString(message.SerializeToString()) == message
        assert json_format.Parse(json_format.MessageToJson(message), cls()) == message


def test_manifest_round_trips_through_json_with_field_names_kept() -> None:
    manifest = _manifest()
    text = json_format.MessageToJson(manifest, preserving_proto_field_name=True)
    # Stock protobuf JSON: enums by name, int64 as strings, snake_case names when asked.
    assert '"format_version": 1' in text
    assert '"QUANT_DTYPE_INT8"' in text
    assert '"size_bytes": "123456"' in text
    parsed = json_format.Parse(text, manifest_pb2.BundleManifest())
    assert parsed == manifest
    assert manifest_pb2.BundleManifest.FromString(manifest.SerializeToString()) == manifest


def test_unknown_json_field_is_rejected_unless_asked() -> None:
    text = '{"format_version": 1, "name": "m", "not_a_field": 3}'
    try:
        json_format.Parse(text, manifest_pb2.BundleManifest())
    except json_format.ParseError as error:
        assert "not_a_field" in str(error)
    else:  # pragma: no cover - the assertion below documents the expectation
        raise AssertionError("an unknown manifest field was accepted")
    lenient = json_format.Parse(text, manifest_pb2.BundleManifest(), ignore_unknown_fields=True)
    assert lenient.name == "m"


def test_wire_names_are_recship_v1() -> None:
    service = recommender_pb2.DESCRIPTOR.services_by_name["Recommender"]
    assert service.full_name == "recship.v1.Recommender"
    assert [m.name for m in service.methods] == ["Retrieve", "Rank", "Recommend"]
    admin = admin_pb2.DESCRIPTOR.services_by_name["BundleAdmin"]
    assert {m.name for m in admin.methods} >= {
        "ListBundles",
        "LoadVersion",
        "UnloadVersion",
        "SetVersionPolicy",
        "SetLabel",
    }
