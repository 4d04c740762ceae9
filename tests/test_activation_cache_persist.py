"""A persisted activation cache (issue 24): a later run on the same model and rows reads what an earlier one
computed, a different model / layer / row set gets its own folder, and the values equal the decoder's own."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset
from tiny_models import one_torch_thread, tiny_llama

from hetlora_bench.activation_cache import PERSIST_ENV, ActivationCache

LAYERS = 4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_torch_thread()


def rows(n: int = 6, seed: int = 3) -> Dataset:
    rng = np.random.default_rng(seed)
    ids = [rng.integers(0, 96, size=int(rng.integers(3, 20))).tolist() for _ in range(n)]
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids], "labels": ids})


def _own_hidden(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[2][0]


def test_a_second_run_reuses_the_rows_the_first_computed(tmp_path):
    ds = rows()
    model = tiny_llama(num_hidden_layers=LAYERS)
    first = ActivationCache.build(model, 2, {"x": ds}, persist_dir=tmp_path)
    first["x"].__getitems__([0, 3])
    assert first.computed_rows == 2 and first.reused_rows == 0
    del first  # the run ends
    second = ActivationCache.build(model, 2, {"x": ds}, persist_dir=tmp_path)
    assert second.reused_rows == 2 and second.computed_rows == 2
    assert "2 reused" in second.describe()
    # not the scratch spill file a simulation deletes when its seed is done: that is `path`
    assert second.path is None and second.persist_path is not None and second.persist_path.is_file()
    for i in range(len(ds)):  # reused rows and newly computed ones are the decoder's own hidden states
        torch.testing.assert_close(second["x"][i]["hidden_states"], _own_hidden(model, ds[i]["input_ids"]),
                                   atol=1e-5, rtol=1e-5)
    assert second.computed_rows == len(ds)
    assert len(list(tmp_path.iterdir())) == 1


def test_what_determines_the_states_gets_its_own_folder(tmp_path, monkeypatch):
    ds = rows()
    model = tiny_llama(num_hidden_layers=LAYERS)
    monkeypatch.setenv(PERSIST_ENV, str(tmp_path))  # the environment variable turns persistence on
    ActivationCache.build(model, 2, {"x": ds}, eager=True)
    other_rows = ActivationCache.build(model, 2, {"x": rows(seed=4)})  # another corpus / seed
    other_layer = ActivationCache.build(model, 1, {"x": ds})
    other_weights = tiny_llama(num_hidden_layers=LAYERS)
    with torch.no_grad():
        other_weights.model.layers[0].mlp.down_proj.weight.add_(0.5)
    changed = ActivationCache.build(other_weights, 2, {"x": ds})
    assert other_rows.reused_rows == other_layer.reused_rows == changed.reused_rows == 0
    assert len(list(tmp_path.iterdir())) == 4
    torch.testing.assert_close(changed["x"][1]["hidden_states"], _own_hidden(other_weights, ds[1]["input_ids"]),
                               atol=1e-5, rtol=1e-5)


def test_an_unlisted_row_is_recomputed_not_trusted(tmp_path):
    """Rows are trusted only when listed as computed: a lost list (a killed run) recomputes them."""
    ds = rows()
    model = tiny_llama(num_hidden_layers=LAYERS)
    first = ActivationCache.build(model, 2, {"x": ds}, persist_dir=tmp_path, eager=True)
    first.storage.fill_(7.0)  # garbage in the file, as a killed run could leave
    first._memmap.flush()
    next(tmp_path.iterdir()).joinpath("done.npy").unlink()
    again = ActivationCache.build(model, 2, {"x": ds}, persist_dir=tmp_path)
    assert again.reused_rows == 0
    torch.testing.assert_close(again["x"][2]["hidden_states"], _own_hidden(model, ds[2]["input_ids"]),
                               atol=1e-5, rtol=1e-5)
