"""The in-process runner (`run_inprocess_simulation`, no Ray) honours ``next_rank`` as the coordinator does."""

from __future__ import annotations

import functools

import pytest

pytest.importorskip("flwr")

import torch  # noqa: E402
from tiny_models import tiny_llama  # noqa: E402

import hetlora_bench.engines as sim  # noqa: E402
from hetlora_bench.engines import run_inprocess_simulation  # noqa: E402
from hetlora_bench.toy import ToyTask  # noqa: E402
from peft_hetlora import HetLoRAConfig  # noqa: E402
from peft_hetlora.flower import LocalTrainingConfig  # noqa: E402
from peft_hetlora.flower.local_round import LocalRoundResult  # noqa: E402

CONFIG = HetLoRAConfig(r=8, r_min=2, lora_alpha=16, target_modules=["q_proj", "v_proj"])
TASK = ToyTask(num_examples=8, seq_len=16, model_fn=functools.partial(tiny_llama, 0))


def pruning_round(task, state, *, adapter_config, rank, training, seed, components=None):
    """A local round without training that always prunes one component (rank_out = rank - 1)."""
    out = {k: (v[: rank - 1] if ".lora_A." in k else v[:, : rank - 1]) + 0.01 for k, v in state.items()}
    return LocalRoundResult(state_dict=out, num_examples=8, rank_in=rank, rank_out=rank - 1, train_loss=1.0,
                            tail_norm_start=1.0, tail_norm_end=0.5)


@pytest.mark.parametrize("next_rank", ["rank_out", "initial"])
def test_inprocess_runner_honours_next_rank(monkeypatch, next_rank):
    monkeypatch.setattr(sim, "train_local_round", pruning_round)
    ranks = {"client-0": 4, "client-1": 6}
    run = run_inprocess_simulation(TASK, adapter_config=CONFIG, num_clients=2, ranks=ranks, rounds=2,
                                   training=LocalTrainingConfig(local_steps=1, batch_size=4), next_rank=next_rank)
    assigned = [r["assigned_ranks"] for r in run.rounds]
    assert assigned[0] == ranks
    expected_next = {"client-0": 3, "client-1": 5} if next_rank == "rank_out" else ranks
    assert assigned[1] == expected_next and run.client_ranks == (
        {"client-0": 2, "client-1": 4} if next_rank == "rank_out" else ranks)
    assert all(torch.isfinite(v).all() for v in run.final_state_dict.values())


def test_inprocess_runner_refuses_an_unknown_next_rank_rule():
    with pytest.raises(ValueError, match="next_rank must be one of"):
        run_inprocess_simulation(TASK, adapter_config=CONFIG, num_clients=2, next_rank="largest")
