"""A Node.js client (@grpc/grpc-js + @grpc/proto-loader) calls Recommend from the .proto files."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from recship.runtime.client import Query, RecshipClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NODE_DIR = Path(__file__).parent / "node"
PROTO_ROOT = Path(__file__).resolve().parents[2] / "protos"


@pytest.fixture(scope="module")
def node_client() -> Path:
    """Installs the Node packages into the git-ignored node_modules (once)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("Node.js and npm are not installed; the Node client test needs them")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--prefix", str(NODE_DIR)],
            check=True,
            capture_output=True,
            timeout=300,
        )
    return NODE_DIR / "recommend.js"


def test_node_recommend_matches_the_python_client(
    node_client, bundle_repo, serve_process, make_user
) -> None:
    serve = serve_process(bundle_repo)
    features = make_user(7)
    request = {
        "model": {"bundle": "movies"},
        "queries": [
            {
                "query": {
                    "features": {
                        "user_id": {"int_value": features["user_id"]},
                        "user_gender": {"string_value": features["user_gender"]},
                        "user_log_activity": {"double_value": 0.5},
                    }
                },
                "exclude_item_ids": ["1", "2", "3"],
            }
        ],
        "retrieve_k": 20,
        "top_n": 5,
    }
    with RecshipClient(serve.target, timeout=30) as client:
        client.wait_until_serving(120)
        sent = {k: features[k] for k in ("user_id", "user_gender")} | {"user_log_activity": 0.5}
        expected = client.recommend("movies", [Query(sent)], 20, 5, exclude=[["1", "2", "3"]])
        output = subprocess.run(
            ["node", str(node_client), serve.target, str(PROTO_ROOT), json.dumps(request)],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        bad = dict(request, top_n=50)
        error = subprocess.run(
            ["node", str(node_client), serve.target, str(PROTO_ROOT), json.dumps(bad)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    response = json.loads(output)
    assert response["served_by"]["bundle"] == "movies"
    assert int(response["served_by"]["version"]) == expected.served_by.version
    items = response["results"][0]["items"]
    assert [i["item_id"] for i in items] == [i.item_id for i in expected.results[0]]
    for got, want in zip(items, expected.results[0], strict=True):
        assert got["rank_score"] == pytest.approx(want.rank_score, abs=1e-6)
    assert error.returncode == 2
    assert json.loads(error.stdout) == {
        "code": 3,
        "details": "top_n: 50 is out of bounds [1, 20]",
    }
    assert serve.terminate() == 0
