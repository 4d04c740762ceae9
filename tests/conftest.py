"""Shared pytest fixtures: the Hub test double and the adapter stores (LocalStore and HubStore on the double)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest

try:  # tests/ as a package or as a rootdir-relative folder
    from tests.hub_double import HubDouble
except ImportError:  # pragma: no cover
    from hub_double import HubDouble


STORE_KINDS = ("local", "hub", "hub-pr")


@pytest.fixture
def hub_double(monkeypatch: pytest.MonkeyPatch) -> Iterator[HubDouble]:
    """A Hub HTTP test double on 127.0.0.1 (random port): `.endpoint`, `.token` (admin), fault injection.

    HF_HUB_OFFLINE would block even this loopback endpoint, so it is switched off for the test.
    """
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    double = HubDouble().start()
    try:
        yield double
    finally:
        double.stop()


@pytest.fixture(params=STORE_KINDS)
def store(request: pytest.FixtureRequest, tmp_path):
    """The coordinator's store: LocalStore, HubStore (client repos) or HubStore (pull requests) on the double."""
    if request.param == "local":
        from peft_hetlora.federated.stores import LocalStore

        return LocalStore(tmp_path / "store", create=True)
    from peft_hetlora.federated.stores import HubStore

    double = request.getfixturevalue("hub_double")
    return HubStore(
        f"hetlora/fed-{uuid.uuid4().hex[:8]}",
        endpoint=double.endpoint,
        token=double.token,
        client_mode="pr" if request.param == "hub-pr" else "client_repo",
        cache_dir=tmp_path / "hf-cache",
    )


@pytest.fixture
def client_store(store, request: pytest.FixtureRequest, tmp_path) -> Callable[[str], object]:
    """`client_store(client_id)`: the same store as a client sees it (on the Hub: its own token, which can write
    only its own repo in client_repo mode and nothing in pr mode)."""
    from peft_hetlora.federated.stores import HubStore, LocalStore

    def make(client_id: str):
        if isinstance(store, LocalStore):
            return LocalStore(store.path)
        double = request.getfixturevalue("hub_double")
        token = f"hf_client_{client_id}"
        write = [store.client_repo_for(client_id)] if store.client_mode == "client_repo" else []
        double.add_token(token, f"user-{client_id}", write=write)
        return HubStore(
            store.repo_id,
            endpoint=store.endpoint,
            token=token,
            client_mode=store.client_mode,
            cache_dir=tmp_path / f"hf-cache-{client_id}",
        )

    return make
