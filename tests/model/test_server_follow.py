"""forja serve follows its alias: champion moves in the registry, the next request is answered by the
new version without a restart; a pinned URI never moves; tampered weights are not swapped in."""
from __future__ import annotations

import time

import httpx

from tests.model.test_server import Store, limits, serve_config
from tests.model.test_serving_bounds import register_tiny


def answer(url: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", timeout=30, json={"prompt": "O Linux", "max_tokens": 4,
                                                                  "temperature": 0, "ignore_eos": True})


def wait_for(url: str, label: str, timeout: float = 10.0) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        r = answer(url)
        if r.json()["model"] == label or time.monotonic() > deadline:
            return r
        time.sleep(0.1)


def test_the_alias_moves_and_the_next_request_gets_the_new_version_a_pinned_uri_stays(tmp_path):
    from model.server import build_app, serve_in_thread
    from tasks.models import tracking

    v1, v2, v3 = (str(register_tiny(tmp_path, "follow", seed=s).version) for s in (1, 2, 3))
    client = tracking.client(tmp_path)
    client.set_model_version_tag("follow", v3, "weights_sha256", "0" * 64)  # the registry's record: not these weights
    client.set_registered_model_alias("follow", "champion", v1)
    following = build_app(serve_config("models:/follow@champion"), str(tmp_path), "cpu", Store(), limits())
    pinned = build_app(serve_config(f"models:/follow/{v1}"), str(tmp_path), "cpu", Store(), limits())
    with serve_in_thread(following) as url, serve_in_thread(pinned) as pinned_url:
        first = answer(url)
        assert first.json()["model"] == f"follow/{v1}" and first.headers["x-forja-model-version"] == f"follow/{v1}"
        client.set_registered_model_alias("follow", "champion", v2)
        moved = wait_for(url, f"follow/{v2}")
        assert moved.json()["model"] == f"follow/{v2}" and moved.headers["x-forja-model-version"] == f"follow/{v2}"
        new, old = following.state.follower.current.model, pinned.state.follower.current.model
        assert not new.embed.weight.equal(old.embed.weight)  # the new weights answer (random: their text looks alike)
        assert following.state.follower.swaps == 1
        assert answer(pinned_url).json()["model"] == f"follow/{v1}"  # pinned: never moves

        client.set_registered_model_alias("follow", "champion", v3)  # tampered: refused, v2 keeps answering
        deadline = time.monotonic() + 10
        while v3 not in following.state.follower.failed and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "sha256" in following.state.follower.failed[v3]
        assert answer(url).json()["model"] == f"follow/{v2}"
        assert httpx.get(f"{url}/v1/forja/stats").json()["failed_versions"][v3]
