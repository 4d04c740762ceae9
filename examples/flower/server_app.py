"""The HetLoRA ServerApp: `HetLoRAStrategy` over the connected SuperNodes."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from hetlora_task import adapter_config, build_model, settings

from peft_hetlora.flower import HetLoRAStrategy, LocalTrainingConfig, initial_global_state
from peft_hetlora.flower.records import state_dict_to_arrays

logger = logging.getLogger(__name__)
app = ServerApp()


def open_store(spec: str):
    """"" -> None, "local:PATH" -> LocalStore, "hub:org/name" -> HubStore (token from HF_TOKEN)."""
    if not spec:
        return None
    kind, _, where = spec.partition(":")
    if kind == "local":
        from peft_hetlora.federated.stores import LocalStore

        return LocalStore(Path(where).expanduser(), create=True)
    if kind == "hub":
        from peft_hetlora.federated.stores import HubStore

        return HubStore(where, token=os.environ.get("HF_TOKEN"))
    raise ValueError(f"store must be '', 'local:PATH' or 'hub:org/name', got {spec!r}")


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = settings(context.run_config)
    peft_config = adapter_config(config)
    initial = initial_global_state(build_model(config), peft_config, seed=int(config["seed"]))
    strategy = HetLoRAStrategy(
        peft_config,
        method=str(config["method"]),
        rank_policy=str(config["rank-policy"]),
        clients_per_round=int(config["clients-per-round"]) or None,
        min_available_nodes=int(config["min-nodes"]),
        min_train_nodes=1,
        min_replies=int(config["min-replies"]),
        fraction_evaluate=float(config["fraction-evaluate"]),
        min_evaluate_nodes=1,
        seed=int(config["seed"]),
        training=LocalTrainingConfig(
            local_steps=int(config["local-steps"]),
            batch_size=int(config["batch-size"]),
            learning_rate=float(config["learning-rate"]),
        ),
        store=open_store(str(config.get("store", ""))),
    )
    rounds = int(config["num-server-rounds"])
    strategy.start(grid=grid, initial_arrays=state_dict_to_arrays(initial), num_rounds=rounds)
    for summary in strategy.history:
        m = summary["metrics"]
        logger.warning("round %d: accepted %d, failed %d, rejected %d, train loss %s, mean rank out %s",
                       summary["round"], m["num_accepted"], m["num_failed"], m["num_rejected"], m["train_loss"],
                       m["mean_rank_out"])
