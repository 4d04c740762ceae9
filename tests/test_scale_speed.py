"""Issue 25's speed and memory work: the cheap finiteness check, the norm computed once per client, FlexLoRA's
``"auto"`` folding its stack into the sketch once the stack holds more memory than the sketch, and clients that do
not download the server optimizer's state.

References are independent of the code: numpy's ``isfinite``, numpy's dense ``||B A||_F`` and SVD, the sketch's
size by hand (``8 (d_out + d_in)(l + m)`` bytes, ``l = 2 r + 1``, ``m = 2 l + 1``) and the Hub double's request log.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from safetensors.torch import save_file

from peft_hetlora.federated.aggregation import ClientUpdate, StreamingAggregator, aggregate
from peft_hetlora.federated.aggregation.checks import all_finite
from peft_hetlora.federated.aggregation.influence import factor_steps
from peft_hetlora.federated.aggregation.methods.flexlora import FactorStack
from peft_hetlora.federated.stores import HubStore, LocalStore
from peft_hetlora.utils.constants import ADAPTER_FILE, SERVER_STATE_FILE
from peft_hetlora.utils.errors import AggregationError
from tests.test_store_contract import make_global

A_KEY, B_KEY = "m.lora_A.weight", "m.lora_B.weight"


# ---------------------------------------------------------------------------------------------- finiteness
@settings(max_examples=150, deadline=None)
@given(data=st.data(), dtype=st.sampled_from([np.float16, np.float32, np.float64]),
       shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=40))
def test_all_finite_agrees_with_isfinite_wherever_a_nan_or_inf_sits(data, dtype, shape):
    """A NaN or an infinity anywhere (any position, any count, vectorised body or tail) is caught."""
    values = data.draw(hnp.arrays(dtype, shape, elements=st.floats(width=np.dtype(dtype).itemsize * 8)))
    assert all_finite(torch.from_numpy(values.copy())) == bool(np.isfinite(values).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_all_finite_catches_one_bad_value_at_every_position(dtype, bad):
    for n in (1, 7, 8, 9, 31, 64, 129):
        for pos in range(n):
            t = torch.zeros(n, dtype=dtype)
            t[pos] = bad
            assert not all_finite(t), (n, pos)
    assert all_finite(torch.arange(5)) and all_finite(torch.zeros(0))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_aggregator_still_rejects_a_non_finite_upload(bad):
    good = {A_KEY: torch.randn(2, 8), B_KEY: torch.randn(6, 2)}
    broken = {A_KEY: torch.randn(2, 8), B_KEY: torch.randn(6, 2)}
    broken[B_KEY][5, 1] = bad
    agg = StreamingAggregator("flexlora_held", r_max=2)
    agg.observe(ClientUpdate("good", good, rank=2, num_examples=5))
    with pytest.raises(AggregationError, match="non-finite"):
        agg.observe(ClientUpdate("bad", broken, rank=2, num_examples=5))


# ---------------------------------------------------------------------------------------------- norms
def test_factor_steps_hands_back_the_dense_product_norms():
    rng = np.random.default_rng(0)
    sd = {A_KEY: torch.from_numpy(rng.standard_normal((3, 11)).astype(np.float32)),
          B_KEY: torch.from_numpy(rng.standard_normal((7, 3)).astype(np.float32))}
    sq: dict[str, float] = {}
    step_a, step_b = factor_steps({"m": (A_KEY, B_KEY)}, sd, None, sq_norms=sq)
    dense = sd[B_KEY].double().numpy() @ sd[A_KEY].double().numpy()
    assert sq["m"] == pytest.approx(float(np.sum(dense**2)), rel=1e-12)
    assert step_a == pytest.approx(float(np.linalg.norm(sd[A_KEY].double().numpy())), rel=1e-12)
    assert step_b == pytest.approx(float(np.linalg.norm(sd[B_KEY].double().numpy())), rel=1e-12)


def test_sketch_norm_ball_from_the_aggregator_is_the_dense_sum_of_norms():
    """The norm the aggregator passes down is each client's ``||B_k A_k||_F`` (numpy, dense), weighted by n_k."""
    rng = np.random.default_rng(1)
    d_out, d_in, r_max = 120, 100, 2
    clients = [(rng.standard_normal((d_out, r)).astype(np.float32), rng.standard_normal((r, d_in)).astype(np.float32),
                int(rng.integers(10, 20))) for r in [1, 2, 2, 1, 2] * 8]
    agg = StreamingAggregator("flexlora", r_max=r_max, scaling=2.0)  # the ball is of B A, not of s B A
    updates = [ClientUpdate(f"c{k}", {A_KEY: torch.from_numpy(a), B_KEY: torch.from_numpy(b)}, rank=a.shape[0],
                            num_examples=n) for k, (b, a, n) in enumerate(clients)]
    for u in updates:
        agg.observe(u)
    for u in updates:
        agg.add(u)
    stack = agg._accs["m"]
    assert stack.sketch is not None  # 60 components > fold_at
    dense = sum(n * np.linalg.norm(b.astype(np.float64) @ a.astype(np.float64)) for b, a, n in clients)
    assert stack.sketch.norm_sum + stack.norm_pending == pytest.approx(dense, rel=1e-9)


# ---------------------------------------------------------------------------------------------- auto's fold
def _clients(rng, d_out, d_in, ranks):
    return [(rng.standard_normal((d_out, r)).astype(np.float32), rng.standard_normal((r, d_in)).astype(np.float32),
             int(rng.integers(20, 40))) for r in ranks]


def _updates(clients):
    return [ClientUpdate(f"c{k:03d}", {A_KEY: torch.from_numpy(a), B_KEY: torch.from_numpy(b)}, rank=a.shape[0],
                         num_examples=n) for k, (b, a, n) in enumerate(clients)]


def test_fold_at_is_where_the_float32_stack_outgrows_the_sketch():
    """By hand: a component costs 4 (d_out + d_in) bytes; the sketch 8 (d_out l + m d_in) (Y, X in float64) plus
    4 (d_in l + m d_out) (Omega, Psi in float32)."""
    for (d_out, d_in, r) in [(2048, 8192, 16), (512, 2048, 16), (2048, 2048, 64), (120, 100, 2)]:
        l_size = 2 * r + 1
        m_size = 2 * l_size + 1
        stack = FactorStack("m", (r, d_in), (d_out, r), r)
        sketch = 8 * (d_out * l_size + m_size * d_in) + 4 * (d_in * l_size + m_size * d_out)
        assert stack.fold_at == sketch // (4 * (d_out + d_in))
    assert FactorStack("m", (16, 8192), (2048, 16), 16).fold_at == 160
    assert FactorStack("m", (16, 2048), (2048, 16), 16).fold_at == 150  # 1.5 (l + m) for a square module


def test_main_job_rounds_stay_exact():
    """4 clients at ranks 2 / 6 / 16 (and held rests) on Llama-3.2-1B shapes: far below 200 components."""
    for d_out, d_in in [(2048, 2048), (512, 2048), (8192, 2048), (2048, 8192)]:
        stack = FactorStack("m", (16, d_in), (d_out, 16), 16, held=True)
        for k, r in enumerate([2, 6, 16, 16]):
            stack.add(f"c{k}", torch.randn(r, d_in), torch.randn(d_out, r), 1, 1.0)
        assert not stack.uses_sketch() and stack.describe()["path"] == "exact"


@pytest.mark.parametrize("held", [False, True])
def test_auto_folds_past_fold_at_and_stays_exact_below(held):
    """d = 120 x 100, r_max 2: fold_at = 23 < min(d) = 100. 21 components: exact (bit-identical to svd="exact",
    numpy's best rank 2); 60 components: the sketch (it was the exact path before issue 25), state flat at the
    sketch's size, and within Tropp et al.'s every-draw bound of numpy's best rank 2."""
    rng = np.random.default_rng(2)
    d_out, d_in, r_max = 120, 100, 2
    prev = (rng.standard_normal((d_out, r_max)).astype(np.float32),
            rng.standard_normal((r_max, d_in)).astype(np.float32))
    previous = {A_KEY: torch.from_numpy(prev[1]), B_KEY: torch.from_numpy(prev[0])} if held else None
    name = "flexlora_held" if held else "flexlora"

    def dense(clients):
        total = float(sum(n for *_, n in clients))
        w = np.zeros((d_out, d_in))
        for b, a, n in clients:
            prod = b.astype(np.float64) @ a.astype(np.float64)
            if held:
                r = a.shape[0]
                prod = prod + prev[0][:, r:].astype(np.float64) @ prev[1][r:].astype(np.float64)
            w += n / total * prod
        return w

    small = _clients(rng, d_out, d_in, [1, 2] * 7)  # 21 components
    res = aggregate(_updates(small), method=name, r_max=r_max, previous=previous)
    assert res.summary()["factorization"]["m"]["path"] == "exact"
    u, s, vh = np.linalg.svd(dense(small))
    best = (u[:, :r_max] * s[:r_max]) @ vh[:r_max]
    got = res.state_dict[B_KEY].double().numpy() @ res.state_dict[A_KEY].double().numpy()
    assert np.linalg.norm(got - best) <= 1e-5 * np.linalg.norm(best)

    large = _clients(rng, d_out, d_in, [1, 2] * 20)  # 60 components: past fold_at, below min(d)
    res = aggregate(_updates(large), method=name, r_max=r_max, previous=previous)
    info = res.summary()["factorization"]["m"]
    assert info["path"] == "sketch" and (info["range_size"], info["corange_size"]) == (5, 11)
    w = dense(large)
    u, s, vh = np.linalg.svd(w)
    tau = float(np.sqrt(np.sum(s[r_max:] ** 2)))
    got = res.state_dict[B_KEY].double().numpy() @ res.state_dict[A_KEY].double().numpy()
    err = float(np.linalg.norm(w - got))
    assert err >= tau * (1 - 1e-6)  # Eckart-Young: a check of the reference
    # every draw: ||W - [W_hat]_r|| <= tau + 2 ||W - W_hat||; W_hat's error is at most ||W||_F-sized, so bound loosely
    assert err <= tau + 2 * float(np.linalg.norm(w))

    stack = FactorStack("m", (r_max, d_in), (d_out, r_max), r_max, held=held)
    sizes = []
    for k, (b, a, _) in enumerate(large):
        stack.add(f"c{k}", torch.from_numpy(a), torch.from_numpy(b), 1, 1.0)
        sizes.append(stack.state_bytes())
    l_size, m_size = 5, 11
    sketch = 8 * (d_out * l_size + m_size * d_in) + 4 * (d_in * l_size + m_size * d_out)  # Y, X f64; Omega, Psi f32
    per_component = 4 * (d_out + d_in) + 8  # a float32 column of B and row of A, and its float64 weight
    assert max(sizes) <= sketch + per_component * (stack.fold_at + r_max) + 8 * r_max
    assert sizes[-1] <= sketch + per_component * (stack.flush_at + r_max) + 8 * r_max  # sketch + a flush's buffer
    stack.result(None)
    assert stack.state_bytes() == sketch + 8 * r_max  # + missing


# ---------------------------------------------------------------------------------------------- stores
def _global_with_server_state(tmp_path, round_idx):
    folder = make_global(tmp_path, round_idx, seed=round_idx)
    save_file({"m.exp_avg": torch.randn(64, 64)}, str(folder / SERVER_STATE_FILE), metadata={"format": "pt"})
    return folder


def test_hub_client_does_not_download_the_server_state(hub_double, tmp_path):
    fed = HubStore("hetlora/fed", endpoint=hub_double.endpoint, token=hub_double.token, cache_dir=tmp_path / "c")
    fed.write_federation({"base_model": "org/base", "r_min": 1, "r_max": 4})
    fed.publish_global(0, make_global(tmp_path, 0, seed=0))
    g1 = _global_with_server_state(tmp_path, 1)
    fed.publish_global(1, g1)
    published = sorted(p.name for p in g1.iterdir())
    assert SERVER_STATE_FILE in published

    hub_double.add_token("tok-alice", "user-alice", write=[fed.client_repo_for("alice")])
    client = HubStore(fed.repo_id, endpoint=fed.endpoint, token="tok-alice", cache_dir=tmp_path / "alice")
    fetches = {"get": lambda: client.get_global(1, server_state=False),
               "latest": lambda: client.latest_global(server_state=False)}
    for kind, fetch in fetches.items():
        mark = len(hub_double.calls)
        got = fetch()
        gets = sum(1 for verb, route, _, _ in hub_double.calls[mark:] if verb == "GET" and route == "resolve")
        assert got.round == 1 and (got.path / ADAPTER_FILE).read_bytes() == (g1 / ADAPTER_FILE).read_bytes()
        assert not (got.path / SERVER_STATE_FILE).exists()
        # the first fetch downloads every file but the server state; the second finds them in its cache
        assert gets == (len(published) - 1 if kind == "get" else 0)

    coordinator = HubStore(fed.repo_id, endpoint=fed.endpoint, token=hub_double.token, cache_dir=tmp_path / "co")
    mark = len(hub_double.calls)
    full = coordinator.get_global(1)
    gets = sum(1 for verb, route, _, _ in hub_double.calls[mark:] if verb == "GET" and route == "resolve")
    assert gets == len(published)
    assert (full.path / SERVER_STATE_FILE).read_bytes() == (g1 / SERVER_STATE_FILE).read_bytes()


def test_local_store_takes_the_same_keyword(tmp_path):
    store = LocalStore(tmp_path / "fed", create=True)
    store.write_federation({"base_model": "org/base", "r_min": 1, "r_max": 4})
    store.publish_global(0, _global_with_server_state(tmp_path, 0))
    client = store.get_global(0, server_state=False)
    assert client == store.get_global(0) == store.latest_global(server_state=False)
    assert (client.path / ADAPTER_FILE).is_file()
