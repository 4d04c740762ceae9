"""The `Workbench` of one seed: the corpus, tokenised splits, base model folder and activation cache a run shares.

`prepare(config, seed)` builds it once per seed; every arm of [`runner`][hetlora_bench.runner] trains and
evaluates through it (re-exported from `runner`).

Example:
    ```py
    >>> wb = prepare(SimulationConfig.from_sources(profile="quick"), seed=0)  # doctest: +SKIP
    >>> wb.initial_heldout_ppl(model)  # doctest: +SKIP
    ```
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_hetlora.model_source import resolve_model, resolve_tokenizer, tiny_llama

from .activation_cache import (
    ActivationCache,
    CachedBlocks,
    CachedCollator,
    TopLayersCausalLM,
    cache_plan,
    cached_perplexity,
)
from .arms import SimulationConfig
from .data import CausalLMCollator, FederatedCorpus, load_client_corpus, pad_token_id, tokenize_for_clm
from .metrics.loss_eval import evaluate_perplexity

logger = logging.getLogger("hetlora_bench.runner")  # the runner's log name, unchanged by the split


@dataclass
class Workbench:
    """What every arm of one seed shares: the base model, tokenised client data, evaluation sets."""

    config: SimulationConfig
    seed: int
    model_dir: Path
    tokenizer: Any
    corpus: FederatedCorpus
    train: dict[str, Any]
    validation: dict[str, Any]
    heldout: Any
    base_model: Any
    collator: CausalLMCollator
    target_layers: list[int] | None
    base_heldout_ppl: float | None = None
    cache: ActivationCache | None = None
    cache_note: str = ""
    base_fixed_val_ppl: float | None = field(default=None, repr=False)

    def fixed_validation_clients(self) -> list[str]:
        """The clients whose validation examples form the fixed federation validation set: every client of the
        federation with at least one validation example, sorted (the same for every arm and round of a seed)."""
        return sorted(cid for cid, ds in self.validation.items() if len(ds))

    def fixed_validation_set(self) -> Any:
        """The fixed federation validation set as tokenised rows: every client's ``client_val`` split (capped at
        ``client_val_max_examples`` per client by `prepare`), pooled in `fixed_validation_clients` order.

        Only the clients' own validation examples: held-out owners are never clients (docs/benchmarks.md).
        """
        from datasets import concatenate_datasets

        return concatenate_datasets([self.validation[cid] for cid in self.fixed_validation_clients()])

    def fixed_validation_ppl(self, model: Any) -> float:
        """Token-weighted perplexity of `model` on the fixed federation validation set (`fixed_validation_set`):
        ``exp(sum of token NLL / tokens)`` over all of it, like `heldout_ppl`; through the activation cache when
        there is one. In a real federation this is the federated evaluation round over all clients (Flower's
        evaluate round), each client reporting its NLL sum and token count."""
        clients = self.fixed_validation_clients()
        if not clients:
            return float("nan")
        if self.cache is not None:
            view = model if isinstance(model, TopLayersCausalLM) else TopLayersCausalLM(model, self.cache.first_layer)
            blocks = CachedBlocks.concatenate([self.cache[f"validation/{cid}"] for cid in clients])
            return cached_perplexity(view, blocks, batch_size=self.config.eval_batch_size)["perplexity"]
        return _ppl(model, self.fixed_validation_set(), self.config)

    def initial_fixed_val_ppl(self, model: Any) -> float:
        """`fixed_validation_ppl` before training (B = 0: the base model), computed once per seed."""
        if self.base_fixed_val_ppl is None:
            self.base_fixed_val_ppl = self.fixed_validation_ppl(model)
        return self.base_fixed_val_ppl

    def initial_heldout_ppl(self, model: Any) -> float:
        """Held-out perplexity before training: every arm starts from B = 0, i.e. the base model."""
        if self.base_heldout_ppl is None:
            self.base_heldout_ppl = self.heldout_ppl(model)
        return self.base_heldout_ppl

    # with the activation cache, training and evaluation run only the adapted top layers
    def trainable(self, model: Any) -> Any:
        """What the Trainer trains: the PEFT model, or its top-layers view over cached hidden states."""
        return TopLayersCausalLM(model, self.cache.first_layer) if self.cache is not None else model

    def train_set(self, cid: str) -> Any:
        return self.cache[f"train/{cid}"] if self.cache is not None else self.train[cid]

    def train_collator(self) -> Any:
        return CachedCollator() if self.cache is not None else self.collator

    def heldout_ppl(self, model: Any) -> float:
        return self._ppl(model, "heldout", self.heldout)

    def validation_ppl(self, model: Any, cid: str) -> float:
        return self._ppl(model, f"validation/{cid}", self.validation[cid])

    def _ppl(self, model: Any, name: str, dataset: Any) -> float:
        if self.cache is not None:
            view = model if isinstance(model, TopLayersCausalLM) else TopLayersCausalLM(model, self.cache.first_layer)
            return cached_perplexity(view, self.cache[name], batch_size=self.config.eval_batch_size)["perplexity"]
        return _ppl(model, dataset, self.config)


# ----------------------------------------------------------------------------- setup
def _model_folder(config: SimulationConfig) -> Path:
    if config.model == "tiny":
        return tiny_llama(resolve_tokenizer())
    return resolve_model(config.model)


def prepare(config: SimulationConfig, seed: int, spill_dir: Path | None = None) -> Workbench:
    """Load the model and the partitioned data once per seed (clear errors before any training).

    With ``config.activation_cache`` (and adapters only on top layers of a supported architecture) the hidden
    states entering the first adapted layer are computed here, once, for every block; past
    ``activation_cache_max_mb`` they are kept in a memmap file under ``spill_dir``.
    """
    model_dir = _model_folder(config)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    corpus = load_client_corpus(
        config.dataset,
        num_clients=config.num_clients,
        min_examples=config.min_examples,
        max_examples_per_client=config.max_examples_per_client,
        max_eval_examples=config.max_eval_examples,
        client_column=config.client_column,
        text_column=config.text_column,
        split_column=config.split_column,
        seed=seed,
    )
    if len(corpus.clients) < config.num_clients:
        raise ValueError(
            f"The corpus has {len(corpus.clients)} eligible clients but num_clients={config.num_clients}; lower "
            f"num_clients or min_examples ({config.min_examples})."
        )
    logger.info("Corpus: %s", corpus.summary())
    block = config.block_size
    train = {
        cid: tokenize_for_clm(ds, tokenizer, block, pad_to_block_size=False) for cid, ds in corpus.clients.items()
    }
    validation = {
        cid: tokenize_for_clm(
            ds.select(range(min(len(ds), config.client_val_max_examples))), tokenizer, block, pad_to_block_size=False
        )
        for cid, ds in corpus.validation.items()
    }
    heldout = tokenize_for_clm(corpus.eval, tokenizer, block, pad_to_block_size=False)
    dtype = torch.float32
    if config.quantize is not None:
        from peft_hetlora.quantization import load_quantized_base

        base = load_quantized_base(str(model_dir), config.quantize, dtype=dtype)
    else:
        base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    base.config.use_cache = False
    if torch.cuda.is_available() and config.quantize is None:
        base = base.to("cuda")
    layers = getattr(base.config, "num_hidden_layers", None)
    target_layers = None
    if config.top_layers and layers:
        target_layers = list(range(max(0, layers - config.top_layers), layers))
    wb = Workbench(
        config,
        seed,
        model_dir,
        tokenizer,
        corpus,
        train,
        validation,
        heldout,
        base,
        CausalLMCollator(pad_token_id=pad_token_id(tokenizer)),
        target_layers,
    )
    if config.activation_cache and config.engine == "inprocess":
        plan = cache_plan(base, target_layers)
        if plan.enabled:
            named = {"heldout": heldout}
            named.update({f"train/{cid}": ds for cid, ds in train.items()})
            named.update({f"validation/{cid}": ds for cid, ds in validation.items()})
            wb.cache = ActivationCache.build(
                base,
                plan.first_layer,
                named,
                batch_size=config.eval_batch_size,
                max_bytes=int(config.activation_cache_max_mb * 2**20),
                spill_dir=spill_dir,
            )
            wb.cache_note = wb.cache.describe()
        else:
            wb.cache_note = f"activation cache off: {plan.reason}"
        logger.info(wb.cache_note)
    else:
        wb.cache_note = f"activation cache off (activation_cache={config.activation_cache}, engine={config.engine})"
    return wb


def _ppl(model: Any, dataset: Any, config: SimulationConfig) -> float:
    return evaluate_perplexity(model, dataset, batch_size=config.eval_batch_size, progress=False)["perplexity"]
