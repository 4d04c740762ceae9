"""Model and data of the HetLoRA Flower app: the toy task, or SmolLM2-135M on chitchat conversations by sender.

Both the ServerApp (to build the initial global adapter) and the ClientApp (to train) use `build_model`, so the
adapter always fits the model. Settings come from ``[tool.flwr.app.config]`` (overridable with
``flwr run . --run-config "key=value"``) with the node's ``--node-config`` laid over them.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from hetlora_bench.toy import TOY_TARGET_MODULES, ToyTask, tiny_llama
from peft_hetlora import HetLoRAConfig
from peft_hetlora.flower import ClientTask


@functools.lru_cache(maxsize=1)
def _defaults() -> dict[str, Any]:
    pyproject = Path(__file__).with_name("pyproject.toml")
    if not pyproject.is_file():
        return {}
    return dict(tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"])


def settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The app's settings: ``[tool.flwr.app.config]`` defaults under `config` (run config, node config)."""
    return {**_defaults(), **dict(config)}


def adapter_config(config: Mapping[str, Any]) -> HetLoRAConfig:
    """The federation's adapter: r = r-max, fixed scale lora-alpha / r-max for every client."""
    targets = [t.strip() for t in str(config.get("target-modules", ",".join(TOY_TARGET_MODULES))).split(",")]
    return HetLoRAConfig(
        r=int(config["r-max"]), r_min=int(config["r-min"]), lora_alpha=int(config["lora-alpha"]),
        target_modules=[t for t in targets if t], prune_lambda=float(config.get("prune-lambda", 0.0)),
    )


def toy_task(config: Mapping[str, Any]) -> ToyTask:
    return ToyTask(num_examples=int(config.get("toy-examples", 16)), eval_examples=8, seq_len=32)


@functools.lru_cache(maxsize=2)
def _model_dir(spec: str) -> str:
    from peft_hetlora.model_source import resolve_model

    return str(resolve_model(spec))


def build_model(config: Mapping[str, Any]):
    """A fresh base model for `config["model"]` ("toy", "smollm2-135m" or a local folder)."""
    spec = str(config.get("model", "toy"))
    if spec == "toy":
        return tiny_llama()
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(_model_dir(spec))


@functools.lru_cache(maxsize=4)
def _corpus(num_clients: int, seed: int, max_examples: int):
    from hetlora_bench.data import load_client_corpus

    return load_client_corpus("chitchat", num_clients=num_clients, seed=seed, max_examples_per_client=max_examples)


def task_fn(partition_id: int, config: Mapping[str, Any]) -> ClientTask:
    """One client's model and data: the toy task, or chitchat conversations of one sender (natural non-IID)."""
    config = settings(config)
    if str(config.get("model", "toy")) == "toy":
        return toy_task(config)(partition_id, config)
    from transformers import AutoTokenizer

    from hetlora_bench.data import CausalLMCollator, pad_token_id, tokenize_for_clm

    num_partitions = int(config.get("num-partitions", 10))
    corpus = _corpus(num_partitions, int(config.get("seed", 0)), int(config.get("max-examples-per-client", 64)))
    client = corpus.client_ids[partition_id % len(corpus.client_ids)]
    tokenizer = AutoTokenizer.from_pretrained(_model_dir(str(config["model"])))
    block = int(config.get("block-size", 128))
    return ClientTask(
        model=build_model(config),
        train_dataset=tokenize_for_clm(corpus.clients[client], tokenizer, block, pad_to_block_size=False),
        eval_dataset=tokenize_for_clm(corpus.validation[client], tokenizer, block, pad_to_block_size=False),
        data_collator=CausalLMCollator(pad_token_id=pad_token_id(tokenizer)),
    )
