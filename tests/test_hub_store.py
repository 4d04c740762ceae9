"""HubStore on the Hub test double: repo layout, tags, upload modes, retries (429, 412) and permissions."""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import httpx2
import numpy as np
import pytest
from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import HfHubHTTPError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load, load_file

from peft_hetlora.federated.stores import ClientUploadNotFoundError, HubStore, RetryPolicy, UploadTooLargeError
from peft_hetlora.federated.stores import hub as hub_module
from peft_hetlora.federated.stores.base import CLIENT_FILES
from peft_hetlora.federated.stores.hub_requests import FileTooLargeError, HubRepo, retry_after_s

try:  # tests/ as a package or as a rootdir-relative folder
    from tests.test_store_contract import KEY_A, make_client, make_global
except ImportError:  # pragma: no cover
    from test_store_contract import KEY_A, make_client, make_global


@pytest.fixture
def fed(hub_double, tmp_path) -> HubStore:
    """The coordinator's HubStore (client_repo mode) on a fresh federation repo."""
    return HubStore("hetlora/fed", endpoint=hub_double.endpoint, token=hub_double.token, cache_dir=tmp_path / "c")


def as_client(fed: HubStore, double, client_id: str, tmp_path, **kwargs) -> HubStore:
    """The federation as `client_id` sees it: a token that can write only its own repo (client_repo mode)."""
    write = [fed.client_repo_for(client_id)] if fed.client_mode == "client_repo" else []
    double.add_token(f"tok-{client_id}", f"user-{client_id}", write=write)
    return HubStore(fed.repo_id, endpoint=fed.endpoint, token=f"tok-{client_id}", client_mode=fed.client_mode,
                    cache_dir=tmp_path / f"c-{client_id}", **kwargs)


def main_commits(double, repo_id: str) -> list[str]:
    api = HfApi(endpoint=double.endpoint, token=double.token)
    return [c.title for c in api.list_repo_commits(repo_id)]


def test_publish_is_one_commit_with_root_card_and_round_tag(fed, hub_double, tmp_path):
    fed.write_federation({"base_model": "org/base", "r_min": 1, "r_max": 4})
    g0, g1 = make_global(tmp_path, 0, seed=0), make_global(tmp_path, 1, seed=1)
    before = len(main_commits(hub_double, fed.repo_id))
    fed.publish_global(0, g0)
    fed.write_summary(0, {"accepted": ["alice"], "rejected": {}, "metrics": {"loss": 2.0}})
    fed.publish_global(1, g1)
    titles = main_commits(hub_double, fed.repo_id)
    assert len(titles) == before + 3  # publish 0, summary 0, publish 1: one commit each
    assert titles[0] == "hetlora: publish global adapter of round 1"

    api = HfApi(endpoint=hub_double.endpoint, token=hub_double.token)
    refs = api.list_repo_refs(fed.repo_id)
    assert {t.name for t in refs.tags} == {"round-0", "round-1"}
    tagged0 = hub_double.files(fed.repo_id, "round-0")
    assert tagged0["adapter_model.safetensors"] == (g0 / "adapter_model.safetensors").read_bytes()
    assert tagged0["rounds/0/global/round.json"] == (g0 / "round.json").read_bytes()
    head = hub_double.files(fed.repo_id)
    assert head["adapter_model.safetensors"] == (g1 / "adapter_model.safetensors").read_bytes()
    assert head["rounds/1/global/adapter_model.safetensors"] == head["adapter_model.safetensors"]
    assert b"| 0 | 1: alice | - | loss=2 |" in head["README.md"]

    fed.publish_global(1, g1)  # idempotent: no new commit, the tag stays
    assert len(main_commits(hub_double, fed.repo_id)) == before + 3


def test_root_of_main_loads_with_plain_safetensors_from_a_resolve_url(fed, hub_double, tmp_path):
    g0 = make_global(tmp_path, 0, seed=0)
    fed.publish_global(0, g0)
    url = f"{hub_double.endpoint}/{fed.repo_id}/resolve/main/adapter_model.safetensors"
    response = httpx2.get(url, headers={"Authorization": f"Bearer {hub_double.token}"})
    assert response.status_code == 200 and response.headers["X-Repo-Commit"]
    np.testing.assert_array_equal(load(response.content)[KEY_A],
                                  load_file(str(g0 / "adapter_model.safetensors"))[KEY_A])
    assert httpx2.get(url).status_code == 401  # private repo, anonymous


def test_peft_loads_the_global_from_the_repo_id(fed, hub_double, tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    import huggingface_hub.constants as constants
    from transformers import LlamaForCausalLM

    try:  # pytest puts tests/ on sys.path when tests/ is not a package ...
        from tiny_models import saved_lora_llama
    except ImportError:  # ... and the repository root when it is
        from tests.tiny_models import saved_lora_llama

    model, config = saved_lora_llama(tmp_path / "g")
    fed.publish_global(0, tmp_path / "g")

    # What HF_ENDPOINT=<double> does in a fresh process (huggingface_hub reads it at import).
    import huggingface_hub.hf_api

    monkeypatch.setattr(constants, "ENDPOINT", hub_double.endpoint)
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", hub_double.endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        hub_double.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "peft-cache"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "peft-cache"))
    torch.manual_seed(0)
    loaded = peft.PeftModel.from_pretrained(LlamaForCausalLM(config), fed.repo_id, token=hub_double.token)
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_client_repo_mode(fed, hub_double, tmp_path):
    fed.publish_global(0, make_global(tmp_path, 0, seed=0, participants=["alice", "bob"]))
    head = hub_double.files(fed.repo_id)
    alice = as_client(fed, hub_double, "alice", tmp_path)
    alice.upload_client(0, "alice", make_client(tmp_path, 0, "alice", seed=1))
    assert hub_double.files(fed.repo_id) == head  # the federation repo is untouched
    assert "rounds/0/clients/alice/client.json" in hub_double.files("hetlora/fed-client-alice")
    assert hub_double.repos[("model", "hetlora/fed-client-alice")].private

    eve = as_client(fed, hub_double, "eve", tmp_path)  # not a participant of round 0
    eve.upload_client(0, "eve", make_client(tmp_path, 0, "eve", seed=2))
    assert fed.list_client_uploads(0) == ["alice"]

    with pytest.raises(HfHubHTTPError, match="403"):  # alice's token cannot write bob's repo
        HubStore(fed.repo_id, endpoint=fed.endpoint, token="tok-alice", cache_dir=tmp_path / "x").upload_client(
            0, "bob", make_client(tmp_path, 0, "bob", seed=3))
    assert fed.list_client_uploads(0) == ["alice"]


def test_client_repo_ids_and_participants(fed, hub_double, tmp_path):
    assert fed.client_repo_for("alice") == "hetlora/fed-client-alice"
    custom = HubStore("hetlora/fed", endpoint=fed.endpoint, client_repo_id="{namespace}-{client_id}/{name}")
    assert custom.client_repo_for("alice") == "hetlora-alice/fed"
    assert HubStore("hetlora/fed", client_repo_id=lambda c: f"users/{c}").client_repo_for("bo") == "users/bo"
    with pytest.raises(ValueError, match="not a valid Hub repo id"):
        fed.client_repo_for("a--b")
    g = make_global(tmp_path, 0, seed=0)
    (g / "round.json").write_text(json.dumps({"round": 0}))
    fed.publish_global(0, g)
    with pytest.raises(ValueError, match="participants"):
        fed.list_client_uploads(0)


def test_pr_mode(hub_double, tmp_path):
    fed = HubStore("hetlora/fed", endpoint=hub_double.endpoint, token=hub_double.token, client_mode="pr",
                   cache_dir=tmp_path / "c")
    fed.publish_global(0, make_global(tmp_path, 0, seed=0))
    head = hub_double.files(fed.repo_id)
    alice = as_client(fed, hub_double, "alice", tmp_path)
    bob = as_client(fed, hub_double, "bob", tmp_path)
    alice.upload_client(0, "alice", make_client(tmp_path, 0, "alice", seed=1))
    bob.upload_client(0, "bob", make_client(tmp_path, 0, "bob", seed=2))
    second = make_client(tmp_path, 0, "alice", seed=3)
    alice.upload_client(0, "alice", second)
    assert hub_double.files(fed.repo_id) == head  # main untouched: uploads live in refs/pr/1..3
    assert sorted(hub_double.repos[("model", fed.repo_id)].refs) == [
        "refs/heads/main", "refs/pr/1", "refs/pr/2", "refs/pr/3", "refs/tags/round-0"]
    assert fed.list_client_uploads(0) == ["alice", "bob"]
    assert fed.list_client_uploads(1) == []
    folder = fed.download_client(0, "alice")  # the newest pull request wins
    assert (folder / "adapter_model.safetensors").read_bytes() == (second / "adapter_model.safetensors").read_bytes()
    for d in hub_double.repos[("model", fed.repo_id)].discussions:  # closed pull requests are ignored
        d["status"] = "closed" if d["num"] == 2 else d["status"]
    assert fed.list_client_uploads(0) == ["alice"]


def test_429_is_retried_after_retry_after(fed, hub_double, tmp_path):
    waits = []
    fed.hub.sleep = waits.append
    hub_double.inject("commit", 429, times=2, headers={"Retry-After": "0.05"})
    fed.publish_global(0, make_global(tmp_path, 0, seed=0))
    assert waits == [0.05, 0.05]
    assert hub_double.count("commit", 429) == 2 and hub_double.count("commit", 200) == 1
    assert fed.latest_global().round == 0

    waits.clear()
    hub_double.inject("commit", 503, times=2)  # no Retry-After: exponential backoff
    fed.write_summary(0, {"accepted": []})
    assert waits == [fed.hub.retry.backoff_s, 2 * fed.hub.retry.backoff_s]


def test_429_gives_up_when_asked_to_wait_too_long_or_too_often(fed, hub_double, tmp_path):
    fed.hub.sleep = lambda s: None
    hub_double.inject("commit", 429, headers={"Retry-After": "3600"})
    with pytest.raises(HfHubHTTPError, match="max_wait_s"):
        fed.write_federation({"r_max": 4})
    fed.hub.retry = RetryPolicy(max_retries=2)
    hub_double.inject("commit", 429, times=3, headers={"Retry-After": "0"})
    with pytest.raises(HfHubHTTPError, match="429"):
        fed.write_federation({"r_max": 4})
    assert hub_double.count("commit", 429) == 4


def test_412_stale_parent_is_retried(fed, hub_double, tmp_path):
    fed.write_federation({"r_max": 4})
    # Another writer commits between our read of the head and our commit: our parent_commit is stale.
    hub_double.before("commit", lambda d: d.commit(fed.repo_id, {"notes.txt": b"someone else"}))
    fed.publish_global(0, make_global(tmp_path, 0, seed=0))
    assert hub_double.count("commit", 412) == 1
    head = hub_double.files(fed.repo_id)
    assert head["notes.txt"] == b"someone else" and "rounds/0/global/adapter_model.safetensors" in head

    fed.hub.retry = RetryPolicy(max_retries=1)
    hub_double.before("commit", lambda d: d.commit(fed.repo_id, {"notes.txt": b"again"}), times=2)
    with pytest.raises(HfHubHTTPError, match="412"):
        fed.write_summary(0, {"accepted": []})


def test_client_token_cannot_write_the_federation_repo(fed, hub_double, tmp_path):
    fed.publish_global(0, make_global(tmp_path, 0, seed=0))
    alice = as_client(fed, hub_double, "alice", tmp_path)
    api = HfApi(endpoint=hub_double.endpoint, token="tok-alice")
    with pytest.raises(HfHubHTTPError, match="403"):
        api.create_commit(fed.repo_id, [CommitOperationAdd("x.txt", b"x")], commit_message="sneak")
    with pytest.raises(HfHubHTTPError, match="403"):
        alice.write_summary(0, {"accepted": ["alice"]})
    with pytest.raises(HfHubHTTPError, match="403"):
        alice.publish_global(1, make_global(tmp_path, 1, seed=1))
    assert fed.read_summary(0) is None and fed.latest_global().round == 0


def test_wrong_token_is_rejected(fed, hub_double, tmp_path):
    fed.publish_global(0, make_global(tmp_path, 0, seed=0))
    stranger = HubStore(fed.repo_id, endpoint=fed.endpoint, token="hf_wrong", cache_dir=tmp_path / "s")
    with pytest.raises(HfHubHTTPError, match="401"):
        stranger.latest_global()


def test_download_refuses_files_over_the_limit(fed, hub_double, tmp_path):
    fed.publish_global(0, make_global(tmp_path, 0, seed=0))
    as_client(fed, hub_double, "alice", tmp_path).upload_client(0, "alice", make_client(tmp_path, 0, "alice", seed=1))
    fed.max_client_file_bytes = 100
    with pytest.raises(UploadTooLargeError, match="adapter_model.safetensors of \\d+ bytes"):
        fed.download_client(0, "alice")


def test_retry_after_parsing():
    assert retry_after_s({"Retry-After": "0.05"}) == 0.05
    assert retry_after_s({"Retry-After": "7"}) == 7.0
    when = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    assert 25 < retry_after_s({"Retry-After": when}) <= 30
    assert retry_after_s({}) is None


def test_double_speaks_like_the_hub(hub_double):
    api = HfApi(endpoint=hub_double.endpoint, token=hub_double.token)
    api.create_repo("org/r", private=True)
    with pytest.raises(HfHubHTTPError, match="409"):
        api.create_repo("org/r")
    assert api.create_repo("org/r", exist_ok=True).repo_id == "org/r"
    pr = api.create_commit("org/r", [CommitOperationAdd("a/b.txt", b"hi")], commit_message="m", create_pr=True)
    assert pr.pr_revision == "refs/pr/1"
    assert api.list_repo_files("org/r", revision="refs/pr/1") == [".gitattributes", "a/b.txt"]
    assert [f.path for f in api.list_repo_tree("org/r", "a", revision="refs/pr/1")] == ["a/b.txt"]
    assert api.list_repo_commits("org/r", revision="refs/pr/1")[0].created_at.tzinfo is not None
    assert api.whoami()["name"] == "federation"
    with pytest.raises(HfHubHTTPError, match="Invalid user token") as info:
        HfApi(endpoint=hub_double.endpoint, token="nope").whoami()
    assert info.value.response.status_code == 401


# ------------------------------------------------------------------------------------------ issue 10 defects
def test_download_is_one_commit_of_regular_files_even_under_a_reupload(fed, hub_double, tmp_path, monkeypatch):
    # issue 10 items 7 and 11: the validator never follows links (the Hub cache hands out links to blobs), and
    # client.json and the weights must come from the same upload even if the client re-uploads in between
    import os
    import stat as stat_mod

    fed.publish_global(0, make_global(tmp_path, 0, seed=0, participants=["alice"]))
    alice = as_client(fed, hub_double, "alice", tmp_path)
    first = make_client(tmp_path, 0, "alice", seed=1)
    second = make_client(tmp_path, 0, "alice", seed=2)
    alice.upload_client(0, "alice", first)
    real_download, fired = HubRepo.download, []

    def download_then_reupload(self, repo, path, revision):
        out = real_download(self, repo, path, revision)
        if not fired and self is fed.hub:
            fired.append(path)
            alice.upload_client(0, "alice", second)  # a new commit lands between the two downloads
        return out

    monkeypatch.setattr(HubRepo, "download", download_then_reupload)
    folder = fed.download_client(0, "alice")
    assert fired
    for name in ("client.json", "adapter_model.safetensors"):
        assert stat_mod.S_ISREG(os.lstat(folder / name).st_mode), name  # a copy, not a link into the cache
        assert (folder / name).read_bytes() == (first / name).read_bytes(), name
    monkeypatch.setattr(HubRepo, "download", real_download)
    again = fed.download_client(0, "alice")
    assert (again / "adapter_model.safetensors").read_bytes() == (second / "adapter_model.safetensors").read_bytes()


def test_a_missing_round_tag_is_created_when_the_coordinator_resumes(hub_double, tmp_path, monkeypatch):
    # issue 10 item 10 on the Hub: the round's files and root are one commit; only the tag can be left behind
    try:
        from tests.test_coordinator import FakeClients, Killed, initial_adapter, make_coordinator
    except ImportError:  # pragma: no cover
        from test_coordinator import FakeClients, Killed, initial_adapter, make_coordinator

    store = HubStore("hetlora/fed", endpoint=hub_double.endpoint, token=hub_double.token, cache_dir=tmp_path / "c")
    coord = make_coordinator(store, None, rounds=1, clients_per_round=4)
    coord.init(initial_adapter(tmp_path / "init", r_max=4))
    clients = FakeClients(store, tmp_path / "work")
    clients.upload_open_round()
    real_tag = store.api.create_tag

    def dies_on_final_tag(repo_id, *, tag, **kwargs):
        if tag == "round-1":
            raise Killed("tag")
        return real_tag(repo_id, tag=tag, **kwargs)

    monkeypatch.setattr(store.api, "create_tag", dies_on_final_tag)
    with pytest.raises(Killed):
        coord.run()
    monkeypatch.setattr(store.api, "create_tag", real_tag)
    repo = hub_double.repos[("model", "hetlora/fed")]
    assert "refs/tags/round-1" not in repo.refs and store.latest_global().round == 1
    resumed = make_coordinator(store, None, rounds=1, clients_per_round=4)
    assert resumed.step() == "done"
    assert repo.refs["refs/tags/round-1"] == repo.refs["refs/heads/main"]
    files = hub_double.files("hetlora/fed")
    assert not [p for p in files if "staged-global" in p]  # the publish commit removed the staged copy
    assert json.loads(files["round.json"])["round"] == 1
    commits = main_commits(hub_double, "hetlora/fed")
    assert not [c for c in commits if "stage" in c]  # the staged global travels in the summary's commit
    assert make_coordinator(store, None, rounds=1, clients_per_round=4).step() == "done"
    assert main_commits(hub_double, "hetlora/fed") == commits  # a restart with nothing to repair commits nothing


# ------------------------------------------------------------------------------- HubRepo, composed (issue 23)
def test_retry_policy_waits_follow_the_hand_formula():
    policy = RetryPolicy(max_retries=6, backoff_s=0.25, max_wait_s=3.0)
    expected = [0.25, 0.5, 1.0, 2.0, 3.0, 3.0]  # 0.25 * 2**k, capped at max_wait_s
    assert [policy.wait_s(k, None) for k in range(6)] == expected
    assert policy.wait_s(5, 0.0) == 0.0 and policy.wait_s(0, 120.0) == 120.0  # the Hub's Retry-After wins


def test_hub_store_composes_one_hub_repo_built_from_its_arguments(tmp_path):
    store = HubStore("org/fed", endpoint="https://hub.example", token="t", private=False, max_retries=3,
                     backoff_s=0.5, max_wait_s=9.0, cache_dir=tmp_path / "c")
    assert type(store).__mro__ == (HubStore, object)  # no mixin: the requests live in store.hub
    assert isinstance(store.hub, HubRepo) and store.api is store.hub.api
    assert store.hub.retry == RetryPolicy(max_retries=3, backoff_s=0.5, max_wait_s=9.0)
    assert (store.endpoint, store.hub.private, store.hub.cache_dir) == ("https://hub.example", False,
                                                                          str(tmp_path / "c"))


def test_a_card_is_committed_by_the_store_not_by_the_requests(fed, hub_double):
    fed.write_federation({"r_max": 4})
    assert b"HetLoRA federation" in hub_double.files(fed.repo_id)["README.md"]
    fed.hub.commit(fed.repo_id, lambda snap: ({"notes.txt": b"n"}, []), "plain commit")
    files = hub_double.files(fed.repo_id)
    assert files["notes.txt"] == b"n" and b"HetLoRA federation" in files["README.md"]


header_values = st.one_of(st.text(max_size=40), st.floats(allow_nan=True).map(str),
                          st.datetimes().map(lambda d: format_datetime(d.replace(tzinfo=timezone.utc), usegmt=True)))


@settings(max_examples=200, deadline=None)
@given(value=header_values, ratelimit=st.one_of(st.none(), st.text(max_size=40)))
def test_retry_after_never_fails_on_what_a_server_sends(value, ratelimit):
    headers = {"Retry-After": value} if ratelimit is None else {"Retry-After": value, "RateLimit": ratelimit}
    wait = retry_after_s(headers)
    assert wait is None or (isinstance(wait, float) and wait >= 0.0)
    try:
        seconds = float(value)
    except ValueError:
        return
    if value and seconds == seconds:  # a plain number of seconds (not NaN): taken as is, never negative
        assert wait == max(0.0, seconds)


# ------------------------------------------------------------------------ Hub calls at scale (issue 25)
def upload_round(fed: HubStore, double, tmp_path, participants: list[str], others: list[str] = (),
                 **client_kwargs) -> None:
    """Publish global 0 for `participants`; each of them and each of `others` (look-alikes) uploads once."""
    fed.publish_global(0, make_global(tmp_path, 0, seed=0, participants=participants))
    for k, cid in enumerate([*participants, *others]):
        folder = make_client(tmp_path, 0, cid, seed=k + 1)
        as_client(fed, double, cid, tmp_path, **client_kwargs).upload_client(0, cid, folder)


def calls_since(double, mark: int) -> Counter:
    return Counter(f"{verb} {route}" for verb, route, _, _ in double.calls[mark:])


@pytest.mark.parametrize("num,page_size", [(1, 4), (5, 4), (9, 2)])
def test_round_calls_follow_the_hand_formula(hub_double, tmp_path, num, page_size):
    """collect (list) + close (list again, download every upload): API calls = 1 + 2 ceil(repos / page)."""
    hub_double.page_size = page_size
    participants, others = [f"c{k}" for k in range(num)], ["eve", "c1x"]  # look-alike repos in the listing
    fed = HubStore("hetlora/fed", endpoint=hub_double.endpoint, token=hub_double.token, cache_dir=tmp_path / "c")
    upload_round(fed, hub_double, tmp_path, participants, others)
    coordinator = HubStore("hetlora/fed", endpoint=hub_double.endpoint, token=hub_double.token,
                           cache_dir=tmp_path / "coord")
    mark = len(hub_double.calls)
    assert coordinator.list_client_uploads(0) == sorted(participants)  # collect
    assert coordinator.list_client_uploads(0) == sorted(participants)  # close round lists again
    for cid in participants:
        folder = coordinator.download_client(0, cid)
        assert (folder / "client.json").read_bytes() == (make_client(tmp_path / "again", 0, cid, 0) / "client.json"
                                                          ).read_bytes()
    files_per_client = len(set(CLIENT_FILES) & {p.name for p in make_client(tmp_path / "n", 0, "x", 0).iterdir()})
    listing_pages = -(-(num + len(others)) // page_size)
    calls = calls_since(hub_double, mark)
    assert calls == Counter({
        "GET models": 2 * listing_pages,  # one paginated listing per list call, not one probe per client
        "GET revision": 1,  # the federation repo's head, for round.json (participants cached afterwards)
        "HEAD resolve": 1, "GET resolve": 1 + num * files_per_client,  # round.json, then one GET per file
    })
    api = sum(n for k, n in calls.items() if not k.endswith("resolve"))
    assert api == 1 + 2 * listing_pages


def test_downloads_use_the_listed_commit_without_a_second_look_up(fed, hub_double, tmp_path):
    upload_round(fed, hub_double, tmp_path, ["alice", "bob"])
    assert fed.list_client_uploads(0) == ["alice", "bob"]
    listed_sha = hub_double.repos[("model", "hetlora/fed-client-alice")].refs["refs/heads/main"]
    # alice re-uploads after the listing: the download stays on the listed commit (one upload, never mixed)
    hub_double.commit("hetlora/fed-client-alice", {"rounds/0/clients/alice/client.json": b"{}"})
    mark = len(hub_double.calls)
    folder = fed.download_client(0, "alice")
    assert listed_sha in folder.parts
    assert json.loads((folder / "client.json").read_text())["client_id"] == "alice"
    assert set(calls_since(hub_double, mark)) == {"GET resolve"}  # no repo_info, no HEAD, no listing


def test_hostile_listing_entries_are_ignored(fed, hub_double, tmp_path):
    upload_round(fed, hub_double, tmp_path, ["alice", "bob"], others=["eve"])
    good = {"id": "hetlora/fed-client-alice", "sha": hub_double.repos[("model", "hetlora/fed-client-alice")].refs[
        "refs/heads/main"], "siblings": [{"rfilename": "rounds/0/clients/alice/client.json"},
                                         {"rfilename": "rounds/0/clients/alice/adapter_model.safetensors"}]}
    hostile = [
        "not an object", {"id": 3}, {"id": "hetlora/fed-client-eve", "sha": "a" * 40, "siblings": []},
        {"id": "hetlora/fed-client-bob", "sha": "../../x", "siblings": good["siblings"]},  # not a sha
        {"id": "hetlora/fed-client-bob", "sha": "b" * 40, "siblings": "all"},  # no file list: asks the repo
        {"id": "hetlora/fed-client-carol", "sha": "c" * 40, "siblings": [{"rfilename": "x"}]},
        {"id": "other/fed-client-alice", "sha": "d" * 40}, good,
        {"id": "hetlora/fed-client-alice", "sha": "e" * 40, "siblings": good["siblings"]},  # first entry wins
    ]
    hub_double.inject("models", 200, body=hostile)
    assert fed.list_client_uploads(0) == ["alice"]  # bob's listed sha does not exist: not an upload
    assert json.loads((fed.download_client(0, "alice") / "client.json").read_text())["client_id"] == "alice"
    hub_double.inject("models", 200, body={"not": "a list"})
    with pytest.raises(ValueError, match="not a list"):
        fed.list_client_uploads(0)


def test_a_listed_commit_that_is_gone_is_no_upload(fed, hub_double, tmp_path):
    upload_round(fed, hub_double, tmp_path, ["alice"])
    hub_double.inject("models", 200, body=[{"id": "hetlora/fed-client-alice", "sha": "f" * 40, "siblings": [
        {"rfilename": "rounds/0/clients/alice/client.json"}]}])
    assert fed.list_client_uploads(0) == ["alice"]
    with pytest.raises(ClientUploadNotFoundError):
        fed.download_client(0, "alice")
    assert not [p for p in fed._uploads_root().rglob("*") if p.is_file()]  # nothing half-downloaded is kept


def test_a_flooded_listing_is_cut_short_and_each_participant_checked(fed, hub_double, tmp_path, monkeypatch):
    monkeypatch.setattr(hub_module, "_LISTING_SLACK", (1, 3))
    hub_double.page_size = 2
    upload_round(fed, hub_double, tmp_path, ["alice", "bob"])
    for k in range(40):  # look-alike repos, straight into the double
        hub_double.create_repo(f"hetlora/fed-client-spam{k}")
    mark = len(hub_double.calls)
    assert fed.list_client_uploads(0) == ["alice", "bob"]
    calls = calls_since(hub_double, mark)
    max_entries = 1 * 2 + 3
    assert calls["GET models"] == -(-(max_entries + 1) // 2)  # pages up to the first one past the cap, no more
    assert calls["HEAD resolve"] == 1 + 2  # round.json, then one probe per participant
    assert json.loads((fed.download_client(0, "bob") / "client.json").read_text())["client_id"] == "bob"


names = st.sampled_from(["rounds/0/clients/alice/client.json", "rounds/0/clients/zed/client.json", ""])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=st.lists(st.one_of(
    st.fixed_dictionaries({"id": st.sampled_from(["hetlora/fed-client-alice", "hetlora/fed-client-zed", "x/y"]),
                           "sha": st.one_of(st.text(max_size=41), st.just("a" * 40)),
                           "siblings": st.one_of(st.none(), st.lists(st.fixed_dictionaries({"rfilename": names})))}),
    st.dictionaries(st.text(max_size=8), st.one_of(st.integers(), st.text(max_size=8), st.none()), max_size=4),
    st.integers(), st.text(max_size=8)), max_size=12))
def test_any_listing_yields_only_participants(hub_double, tmp_path_factory, entries):
    tmp_path = tmp_path_factory.mktemp("listing")
    fed = HubStore("hetlora/fed", endpoint=hub_double.endpoint, token=hub_double.token, cache_dir=tmp_path / "c")
    if fed.hub.snapshot_or_none(fed.repo_id) is None or "rounds/0/global/round.json" not in hub_double.files(
            fed.repo_id):
        upload_round(fed, hub_double, tmp_path, ["alice", "bob"])
    hub_double.inject("models", 200, body=entries)
    listed = fed.list_client_uploads(0)
    assert listed == sorted(set(listed)) and set(listed) <= {"alice", "bob"}


def test_client_repo_prefix_only_for_templates_with_one_trailing_client_id():
    assert HubStore("org/fed").client_repo_prefix() == ("org", "fed-client-")
    assert HubStore("org/fed", client_repo_id="{namespace}/u-{client_id}").client_repo_prefix() == ("org", "u-")
    for template in ("{namespace}-{client_id}/{name}", "{namespace}/{client_id}-x", "{namespace}/{nope}-{client_id}"):
        assert HubStore("org/fed", client_repo_id=template).client_repo_prefix() is None
    assert HubStore("org/fed", client_repo_id=lambda c: f"u/{c}").client_repo_prefix() is None


def test_a_callable_client_repo_id_falls_back_to_one_probe_per_participant(hub_double, tmp_path):
    fed = HubStore("hetlora/fed", endpoint=hub_double.endpoint, token=hub_double.token, cache_dir=tmp_path / "c",
                   client_repo_id=lambda c: f"hetlora/up-{c}")
    upload_round(fed, hub_double, tmp_path, ["alice", "bob"], client_repo_id=fed._client_repo_id)
    mark = len(hub_double.calls)
    assert fed.list_client_uploads(0) == ["alice", "bob"]
    assert calls_since(hub_double, mark)["GET models"] == 0
    assert (fed.download_client(0, "bob") / "client.json").is_file()


def test_listed_download_refuses_files_over_the_limit(fed, hub_double, tmp_path):
    upload_round(fed, hub_double, tmp_path, ["alice"])
    assert fed.list_client_uploads(0) == ["alice"]
    fed.max_client_file_bytes = 100
    with pytest.raises(UploadTooLargeError, match="over the limit of 100 bytes"):
        fed.download_client(0, "alice")
    assert not [p for p in fed._uploads_root().rglob("*") if p.is_file()]


def test_fetch_enforces_the_cap_while_streaming_without_a_content_length(fed, hub_double, tmp_path, monkeypatch):
    upload_round(fed, hub_double, tmp_path, ["alice"])
    handle = hub_double.handle

    def no_length(*args):  # a server that streams without announcing the size
        status, headers, out = handle(*args)
        headers.pop("Content-Length", None)
        return status, headers, out

    monkeypatch.setattr(hub_double, "handle", no_length)
    sha = hub_double.repos[("model", "hetlora/fed-client-alice")].refs["refs/heads/main"]
    target = tmp_path / "adapter"
    size = len(hub_double.files("hetlora/fed-client-alice")["rounds/0/clients/alice/adapter_model.safetensors"])
    with pytest.raises(FileTooLargeError):
        fed.hub.fetch("hetlora/fed-client-alice", "rounds/0/clients/alice/adapter_model.safetensors", sha, target,
                      size - 1)
    assert not target.exists()
    fed.hub.fetch("hetlora/fed-client-alice", "rounds/0/clients/alice/adapter_model.safetensors", sha, target, size)
    assert target.stat().st_size == size


@pytest.mark.parametrize("quota,reserve", [(5, 1), (4, 2), (12, 10)])
def test_downloads_are_paced_on_the_ratelimit_header_before_any_429(hub_double, tmp_path, quota, reserve):
    """N paced GETs in windows of `quota` keeping `reserve`: ceil(N / (quota - reserve)) - 1 waits of one window."""
    now = [0.0]
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        now[0] += seconds

    participants = ["alice", "bob", "carol"]
    fed = HubStore("hetlora/fed", endpoint=hub_double.endpoint, token=hub_double.token, cache_dir=tmp_path / "c",
                   rate_reserve=reserve)
    fed.hub.clock, fed.hub.sleep = (lambda: now[0]), sleep
    upload_round(fed, hub_double, tmp_path, participants)
    assert fed.list_client_uploads(0) == participants
    hub_double.set_rate_limit("resolvers", quota, 300.0, lambda: now[0])
    mark = len(hub_double.calls)
    for cid in participants:
        fed.download_client(0, cid)
    gets = calls_since(hub_double, mark)["GET resolve"]
    assert gets == 3 * len(participants)  # adapter, config, client.json
    assert waits == [300.0] * (-(-gets // (quota - reserve)) - 1)
    assert not [c for c in hub_double.calls if c[3] == 429]


def test_a_429_on_a_listed_download_waits_for_retry_after(fed, hub_double, tmp_path):
    waits: list[float] = []
    fed.hub.sleep = waits.append
    upload_round(fed, hub_double, tmp_path, ["alice"])
    assert fed.list_client_uploads(0) == ["alice"]
    hub_double.inject("resolve", 429, times=2, headers={"Retry-After": "7"})
    hub_double.inject("models", 429, headers={"Retry-After": "3"})
    assert (fed.download_client(0, "alice") / "client.json").is_file()
    assert fed.list_client_uploads(0) == ["alice"]
    assert waits == [7.0, 7.0, 3.0]
