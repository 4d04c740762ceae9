"""Exact frozen-prefix activation cache: run the layers below the first adapted one once, reuse them everywhere.

With adapters only on the top decoder layers (``layers_to_transform``), the hidden states that enter the first
adapted layer do not depend on the adapter. A simulation evaluates and trains every arm and round on the same
token blocks, so it can compute those hidden states once per seed (for every training, validation and held-out
block) and run only the adapted top layers, the final norm and the LM head afterwards. The result is exact: the
same float32 inputs go through the same modules (differences are matmul rounding, ~1e-6 relative).

Training stays an ordinary ``transformers.Trainer`` run with the project's callbacks: :class:`TopLayersCausalLM`
wraps the PEFT model (its ``module``, as DDP / accelerate wrappers do, so ``hetlora_peft_model`` finds it),
shares all its modules, and takes ``hidden_states`` instead of ``input_ids``. It rebuilds the causal mask and
the rotary position embeddings for positions ``0..T-1`` exactly as the decoder does for a fresh sequence, adds
the HetLoRA regulariser the tuner's forward hook would add, and computes the loss of the model's own loss
function (``num_items_in_batch`` included), so the adapter saved and uploaded is the one the uncached path trains.
The norm and the LM head run only where a next-token label exists (not on padding nor on a row's last position).

Rows are stored without padding (right padding never changes the real tokens' states under a causal mask), in
one float32 array of ``total_tokens x hidden_size``; past ``max_bytes`` the array is a ``numpy.memmap`` file
in the run folder instead of RAM. A row is computed the first time it is read (a batch's missing rows at once),
so a short run pays only for the rows it uses and never more than the uncached path.

Persisted (``persist_dir``, or the folder named by ``HETLORA_ACTIVATION_CACHE_DIR``): the memmap file and the
list of computed rows live in ``<persist_dir>/<model>-L<first_layer>-<key>/``, ``key`` a SHA-256 of what the
hidden states depend on (the model's name, config and a sample of the frozen weights, the first adapted layer, every
token row), so every later `hetlora simulate` call on the same model, corpus and seed reads the rows an earlier one
computed instead of refilling them; a different corpus, seed, model or layer gets another folder. Rows are
flushed before they are marked computed, so a killed run never marks an unwritten row.

Supported: Llama-architecture decoders (``model_type == "llama"``, e.g. SmolLM2). Anything else, or adapters
that reach layer 0, falls back to the full forward (see :func:`cache_plan`).

Example:
    >>> plan = cache_plan(base_model, target_layers=[22, 23, 24, 25, 26, 27, 28, 29])  # doctest: +SKIP
    >>> cache = ActivationCache.build(base_model, plan.first_layer, {"heldout": blocks})  # doctest: +SKIP
    >>> wrapper = TopLayersCausalLM(peft_model, plan.first_layer)  # doctest: +SKIP
    >>> cached_perplexity(wrapper, cache["heldout"], batch_size=16)["perplexity"]  # doctest: +SKIP
    109.1
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutput

from .metrics.loss_eval import IGNORE_INDEX, perplexity_from_nll, shifted_nll

#: decoder families whose forward is embed -> layers(mask, rotary) -> norm -> lm_head, as rebuilt here
SUPPORTED_MODEL_TYPES = ("llama",)

#: environment variable naming a folder where caches persist across `hetlora simulate` calls (issue 24): one
#: sub-folder per model / frozen layers / token rows (so per corpus and seed), keyed by what determines its content
PERSIST_ENV = "HETLORA_ACTIVATION_CACHE_DIR"


@dataclass(frozen=True)
class CachePlan:
    """Whether the cache applies: ``first_layer`` (the first adapted layer) or ``None`` and the reason."""

    first_layer: int | None
    reason: str

    @property
    def enabled(self) -> bool:
        return self.first_layer is not None


def _decoder(causal_lm: nn.Module) -> nn.Module:
    return causal_lm.model


def cache_plan(base_model: nn.Module, target_layers: Sequence[int] | None) -> CachePlan:
    """Decide whether the frozen-prefix cache applies to ``base_model`` with adapters on ``target_layers``.

    Example:
        >>> cache_plan(model, None).reason  # doctest: +SKIP
        'adapters on every layer (top_layers is None): nothing below them to cache'
    """
    model_type = getattr(getattr(base_model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return CachePlan(None, f"architecture {model_type!r} is not supported (only {list(SUPPORTED_MODEL_TYPES)})")
    decoder = getattr(base_model, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if decoder is None or not all(hasattr(decoder, n) for n in needed) or not hasattr(base_model, "lm_head"):
        return CachePlan(None, "the model does not have the Llama module layout (model.layers, norm, lm_head)")
    if not target_layers:
        return CachePlan(None, "adapters on every layer (top_layers is None): nothing below them to cache")
    first = min(int(i) for i in target_layers)
    if first <= 0:
        return CachePlan(None, "adapters reach layer 0: nothing below them to cache")
    if getattr(base_model.config, "sliding_window", None):
        return CachePlan(None, "sliding-window attention is not supported by the cache")
    if getattr(base_model.config, "attention_dropout", 0.0):
        return CachePlan(None, "attention dropout makes the frozen layers' outputs random: nothing to cache")
    return CachePlan(first, f"layers 0..{first - 1} are frozen: their outputs are computed once")


def run_decoder_layers(
    decoder: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor | None, layers: Sequence[nn.Module]
) -> torch.Tensor:
    """Run ``layers`` of a Llama decoder on ``hidden`` (positions ``0..T-1``), as ``LlamaModel.forward`` does."""
    from transformers.masking_utils import create_causal_mask

    position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    mask = create_causal_mask(
        config=decoder.config,
        inputs_embeds=hidden,
        attention_mask=attention_mask,
        past_key_values=None,
        position_ids=position_ids,
    )
    position_embeddings = decoder.rotary_emb(hidden, position_ids=position_ids)
    for layer in layers:
        hidden = layer(
            hidden,
            attention_mask=mask,
            position_embeddings=position_embeddings,
            position_ids=position_ids,
            past_key_values=None,
            use_cache=False,
        )
    return hidden


class TopLayersCausalLM(nn.Module):
    """The adapted top of a HetLoRA ``PeftModel``: cached hidden states -> layers ``first_layer..`` -> norm -> head.

    Shares every module with ``peft_model`` (nothing is copied), so training it trains the PEFT adapter and the
    callbacks (which find the PEFT model as ``.module``) save and upload the same adapter.

    Example:
        >>> wrapper = TopLayersCausalLM(peft_model, first_layer=22)  # doctest: +SKIP
        >>> trainer = Trainer(model=wrapper, args=args, train_dataset=cache["c1"], data_collator=CachedCollator(),
        ...                   callbacks=[FederatedClientCallback(store, "c1")])  # doctest: +SKIP
    """

    #: the Trainer passes ``num_items_in_batch`` (as it does to the causal LM this replaces)
    accepts_loss_kwargs = True

    def __init__(self, peft_model: nn.Module, first_layer: int) -> None:
        super().__init__()
        self.module = peft_model
        self.first_layer = int(first_layer)
        self.config = peft_model.get_base_model().config

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        num_items_in_batch: Any = None,
        **kwargs: Any,
    ) -> CausalLMOutput:
        causal = self.module.get_base_model()
        decoder = _decoder(causal)
        layers = list(decoder.layers)[self.first_layer : decoder.config.num_hidden_layers]
        hidden = run_decoder_layers(decoder, hidden_states, attention_mask, layers)
        if labels is None:
            return CausalLMOutput(logits=causal.lm_head(decoder.norm(hidden)))
        loss = _next_token_loss(causal, decoder.norm, hidden, labels, num_items_in_batch)
        tuner = self.module.base_model
        term = tuner.regularizer() if tuner.training else None
        if term is not None:
            # as the tuner's forward hook: count the term once per optimizer step
            if num_items_in_batch is not None:
                term = term / max(1, int(tuner.gradient_accumulation_steps))
            loss = loss + term.to(loss.dtype)
        # training needs only the loss: no (batch x length x vocab) logits are kept
        return CausalLMOutput(loss=loss)


def _next_token_loss(
    causal: nn.Module, norm: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, num_items_in_batch: Any
) -> torch.Tensor:
    """The causal-LM loss of ``transformers``' ``ForCausalLMLoss`` (shifted labels, ``-100`` ignored, sum /
    ``num_items_in_batch`` or mean over the counted tokens), with the norm and the LM head applied only at the
    positions that have a next-token label: padding and each row's last position never reach the head, which
    on a 49k-token vocabulary costs as much as the adapted layers themselves."""
    targets = labels[:, 1:].to(hidden.device)
    keep = targets != IGNORE_INDEX
    logits = causal.lm_head(norm(hidden[:, :-1][keep])).float()
    nll = nn.functional.cross_entropy(logits, targets[keep], reduction="sum")
    if num_items_in_batch is None:
        return nll / keep.sum().clamp(min=1)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(nll.device)
    return nll / num_items_in_batch


class CachedBlocks(torch.utils.data.Dataset):
    """Token blocks as cached hidden states: item ``i`` is ``{"hidden_states": (len, d), "labels": [len]}``.

    A row's hidden states are computed the first time it is read (``__getitems__`` computes a whole batch's
    missing rows at once, which is how the Trainer's DataLoader reads), then served from the cache.
    """

    def __init__(self, cache: ActivationCache, rows: Sequence[int]) -> None:
        self._cache = cache
        self._rows = list(rows)

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        rows = [self._rows[i] for i in indices]
        self._cache.ensure(rows)
        return [self._cache.item(r) for r in rows]

    def lengths(self) -> list[int]:
        return [len(self._cache.labels[r]) for r in self._rows]

    def select(self, indices: Sequence[int]) -> CachedBlocks:
        """The rows ``indices`` (in that order), sharing the same cache."""
        return CachedBlocks(self._cache, [self._rows[i] for i in indices])

    @staticmethod
    def concatenate(parts: Sequence[CachedBlocks]) -> CachedBlocks:
        """Rows of ``parts`` one after the other (all must come from one :class:`ActivationCache`)."""
        if not parts:
            raise ValueError("Nothing to concatenate.")
        if any(p._cache is not parts[0]._cache for p in parts):
            raise ValueError("CachedBlocks.concatenate needs blocks of the same ActivationCache.")
        return CachedBlocks(parts[0]._cache, [r for p in parts for r in p._rows])


@dataclass
class CachedCollator:
    """Pad cached rows to the batch's longest: zeros for hidden states, 0 attention mask, -100 labels."""

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(r["hidden_states"].shape[0] for r in rows)
        dim = rows[0]["hidden_states"].shape[1]
        hidden = torch.zeros(len(rows), width, dim, dtype=rows[0]["hidden_states"].dtype)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for i, row in enumerate(rows):
            n = row["hidden_states"].shape[0]
            hidden[i, :n] = row["hidden_states"]
            mask[i, :n] = 1
            labels[i, :n] = torch.as_tensor(row["labels"], dtype=torch.long)
        return {"hidden_states": hidden, "attention_mask": mask, "labels": labels}


class ActivationCache:
    """The hidden states entering ``first_layer`` for named sets of token blocks, in RAM or a memmap file.

    Build with :meth:`build`; index by the names given (``cache["heldout"]`` is a :class:`CachedBlocks`).
    Storage for every row is reserved up front (``nbytes``; a memmap file at ``path`` past the limit, else RAM);
    a row is computed once, when first read (so a short run computes only the rows it uses), or all at once with
    ``eager=True``. ``computed_rows`` / ``computed_tokens`` count what was computed.
    """

    def __init__(
        self,
        decoder: nn.Module,
        first_layer: int,
        ids: list[list[int]],
        labels: list[list[int]],
        storage: torch.Tensor,
        path: Path | None,
        batch_size: int,
    ) -> None:
        self._decoder = decoder
        self.first_layer = first_layer
        self.ids = ids
        self.labels = labels
        self.offsets = np.concatenate([[0], np.cumsum([len(x) for x in ids])]).astype(np.int64)
        self.storage = storage
        self.path = path
        self.batch_size = batch_size
        self.nbytes = int(self.offsets[-1]) * int(storage.shape[1]) * storage.element_size()
        self._done = np.zeros(len(ids), dtype=bool)
        self.blocks: dict[str, CachedBlocks] = {}
        self.done_file: Path | None = None  # set for a persisted cache: the computed rows, shared across runs
        # a persisted cache's file; ``path`` (the scratch spill file a run deletes when its seed is done) stays None
        self.persist_path: Path | None = None
        self.reused_rows = 0  # rows a persisted cache found already computed when it was opened
        self._memmap: np.memmap | None = None

    def __getitem__(self, name: str) -> CachedBlocks:
        return self.blocks[name]

    def __contains__(self, name: object) -> bool:
        return name in self.blocks

    @property
    def computed_rows(self) -> int:
        return int(self._done.sum())

    @property
    def computed_tokens(self) -> int:
        return int(sum(len(self.ids[i]) for i in np.flatnonzero(self._done)))

    def describe(self) -> str:
        where = f"memmap file {self.path}" if self.path else "in memory"
        if self.persist_path is not None:
            where = f"persisted memmap file {self.persist_path}"
        reused = f", {self.reused_rows} reused from an earlier run" if self.done_file is not None else ""
        return (
            f"activation cache: hidden states entering layer {self.first_layer}, {len(self.ids)} blocks, "
            f"{self.nbytes / 2**20:.1f} MiB reserved {where}, {self.computed_rows} blocks computed{reused}"
        )

    def item(self, row: int) -> dict[str, Any]:
        start, stop = int(self.offsets[row]), int(self.offsets[row + 1])
        return {"hidden_states": self.storage[start:stop], "labels": self.labels[row]}

    @torch.no_grad()
    def ensure(self, rows: Sequence[int]) -> None:
        """Compute the rows not cached yet (batched by length; right padding does not change real tokens)."""
        missing = sorted({r for r in rows if not self._done[r]}, key=lambda r: len(self.ids[r]))
        if not missing:
            return
        decoder = self._decoder
        device = next(decoder.parameters()).device
        layers = list(decoder.layers)[: self.first_layer]
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            width = max(len(self.ids[r]) for r in chunk)
            input_ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for j, r in enumerate(chunk):
                input_ids[j, : len(self.ids[r])] = torch.tensor(self.ids[r])
                mask[j, : len(self.ids[r])] = 1
            hidden = decoder.embed_tokens(input_ids.to(device))
            hidden = run_decoder_layers(decoder, hidden, mask.to(device), layers).float().cpu()
            for j, r in enumerate(chunk):
                n = len(self.ids[r])
                self.storage[int(self.offsets[r]) : int(self.offsets[r]) + n] = hidden[j, :n]
                self._done[r] = True
        if self.done_file is not None:
            self._save_done()

    def _save_done(self) -> None:
        """Flush the memmap, then record the computed rows (with any another run recorded meanwhile)."""
        if self._memmap is not None:
            self._memmap.flush()
        assert self.done_file is not None
        done = self._done.copy()
        if self.done_file.is_file():
            try:
                other = np.load(self.done_file)
                if other.shape == done.shape:
                    done |= other.astype(bool)
            except (OSError, ValueError):
                pass  # a torn file from a killed run: ours replaces it
        tmp = self.done_file.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, done)
        os.replace(tmp, self.done_file)

    @classmethod
    def build(
        cls,
        base_model: nn.Module,
        first_layer: int,
        datasets_by_name: Mapping[str, Any],
        *,
        batch_size: int = 16,
        max_bytes: int = 1 << 30,
        spill_dir: str | Path | None = None,
        eager: bool = False,
        persist_dir: str | Path | None = None,
    ) -> ActivationCache:
        """A cache of the hidden states that embeddings + layers ``0..first_layer-1`` of ``base_model`` (which
        must carry no adapter there) give for every row of ``datasets_by_name``.

        Args:
            datasets_by_name: name -> tokenised rows (``input_ids``, optional ``labels``; unpadded, as
                ``tokenize_for_clm(..., pad_to_block_size=False)`` makes them).
            max_bytes: above this the storage is a ``numpy.memmap`` in ``spill_dir`` (required then).
            eager: compute every row now instead of on first use.
            persist_dir: keep the cache in a sub-folder of this one keyed by what determines it (see the module
                docstring), reusing the rows earlier runs computed; default: the folder named by
                ``HETLORA_ACTIVATION_CACHE_DIR``, else not persisted.
        """
        all_ids: list[list[int]] = []
        all_labels: list[list[int]] = []
        spans: dict[str, range] = {}
        for name, ds in datasets_by_name.items():
            ids = [list(map(int, x)) for x in ds["input_ids"]] if len(ds) else []
            labels = [list(map(int, x)) for x in ds["labels"]] if len(ds) and "labels" in ds.column_names else ids
            if any(len(x) != len(y) for x, y in zip(ids, labels)):
                raise ValueError(f"Rows of {name!r} have labels of another length than input_ids.")
            spans[name] = range(len(all_ids), len(all_ids) + len(ids))
            all_ids += ids
            all_labels += labels
        total = sum(len(x) for x in all_ids)
        dim = int(base_model.config.hidden_size)
        nbytes = total * dim * 4
        path = None
        persist_dir = persist_dir if persist_dir is not None else (os.environ.get(PERSIST_ENV) or None)
        if persist_dir is not None:
            return cls._open_persisted(base_model, first_layer, all_ids, all_labels, spans, Path(persist_dir),
                                       batch_size, eager)
        if nbytes > max_bytes:
            if spill_dir is None:
                raise ValueError(
                    f"The activation cache needs {nbytes / 2**20:.0f} MiB (limit {max_bytes / 2**20:.0f} MiB); give a "
                    "spill_dir for the memmap file, raise the limit, or turn the cache off."
                )
            Path(spill_dir).mkdir(parents=True, exist_ok=True)
            path = Path(spill_dir) / "activations.f32"
            storage = torch.from_numpy(np.memmap(path, dtype=np.float32, mode="w+", shape=(max(total, 1), dim)))
        else:
            storage = torch.empty(max(total, 1), dim, dtype=torch.float32)
        cache = cls(_decoder(base_model), first_layer, all_ids, all_labels, storage, path, batch_size)
        cache.blocks = {name: CachedBlocks(cache, list(span)) for name, span in spans.items()}
        if eager:
            cache.ensure(range(len(all_ids)))
        return cache

    @classmethod
    def _open_persisted(cls, base_model: nn.Module, first_layer: int, all_ids: list[list[int]],
                        all_labels: list[list[int]], spans: dict[str, range], persist_dir: Path, batch_size: int,
                        eager: bool) -> ActivationCache:
        """Open (or create) the persisted cache of these rows under ``persist_dir``; see :func:`cache_key`."""
        dim = int(base_model.config.hidden_size)
        total = sum(len(x) for x in all_ids)
        key = cache_key(base_model, first_layer, all_ids)
        name = str(getattr(base_model.config, "name_or_path", "") or getattr(base_model.config, "model_type", "model"))
        tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", name.rstrip("/").split("/")[-1])[:48] or "model"
        folder = persist_dir / f"{tag}-L{first_layer}-{key[:20]}"
        folder.mkdir(parents=True, exist_ok=True)
        path, meta_file, done_file = folder / "activations.f32", folder / "meta.json", folder / "done.npy"
        shape = (max(total, 1), dim)
        meta = {"key": key, "shape": list(shape), "rows": len(all_ids), "first_layer": first_layer, "model": name}
        reuse = path.is_file() and meta_file.is_file() and path.stat().st_size == shape[0] * shape[1] * 4
        if reuse:
            try:
                reuse = json.loads(meta_file.read_text(encoding="utf-8")).get("key") == key
            except (OSError, ValueError):
                reuse = False
        if reuse:
            array = np.memmap(path, dtype=np.float32, mode="r+", shape=shape)
        else:
            array = np.memmap(path, dtype=np.float32, mode="w+", shape=shape)
            done_file.unlink(missing_ok=True)
            meta_file.write_text(json.dumps(meta, indent=1), encoding="utf-8")
        cache = cls(_decoder(base_model), first_layer, all_ids, all_labels, torch.from_numpy(array), None,
                    batch_size)
        cache.done_file, cache._memmap, cache.persist_path = done_file, array, path
        if reuse and done_file.is_file():
            try:
                done = np.load(done_file)
                if done.shape == cache._done.shape:
                    cache._done = done.astype(bool)
            except (OSError, ValueError):
                pass  # unreadable list: recompute (the rows themselves are only trusted when listed)
        cache.reused_rows = cache.computed_rows
        cache.blocks = {name: CachedBlocks(cache, list(span)) for name, span in spans.items()}
        if eager:
            cache.ensure(range(len(all_ids)))
        return cache


def cache_key(base_model: nn.Module, first_layer: int, ids: Sequence[Sequence[int]]) -> str:
    """SHA-256 of what the cached hidden states depend on: the model's name and config, a sample of the weights
    of the embedding and the frozen layers ``0 .. first_layer-1`` (their first 4096 values and their sums), the first
    adapted layer and every token row (so the corpus, the seed's split and the tokenizer).

    Example:
        >>> from tiny_models import tiny_llama  # doctest: +SKIP
        >>> cache_key(tiny_llama(), 2, [[1, 2, 3]]) == cache_key(tiny_llama(), 2, [[1, 2, 3]])  # doctest: +SKIP
        True
    """
    digest = hashlib.sha256()
    config = base_model.config
    digest.update(json.dumps({"name": str(getattr(config, "name_or_path", "")), "config": config.to_dict(),
                              "first_layer": int(first_layer)}, sort_keys=True, default=str).encode())
    decoder = _decoder(base_model)
    modules = [decoder.embed_tokens, *list(decoder.layers)[:first_layer]]
    with torch.no_grad():
        for module in modules:
            for pname, param in sorted(module.named_parameters(), key=lambda kv: kv[0]):
                flat = param.detach().reshape(-1).to("cpu", torch.float64)
                digest.update(pname.encode())
                digest.update(flat[:4096].numpy().tobytes())
                digest.update(np.float64(flat.sum().item()).tobytes())
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    digest.update(lengths.tobytes())
    for row in ids:
        digest.update(np.asarray(row, dtype=np.int64).tobytes())
    return digest.hexdigest()


@torch.no_grad()
def cached_perplexity(model: TopLayersCausalLM, blocks: CachedBlocks, batch_size: int = 16) -> dict[str, float]:
    """Token-weighted perplexity on cached blocks: the same numbers as
    :func:`hetlora_bench.metrics.loss_eval.evaluate_perplexity` on the token rows they came from.

    Example:
        >>> cached_perplexity(wrapper, cache["heldout"], batch_size=16)["perplexity"]  # doctest: +SKIP
        109.1
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    lengths = blocks.lengths()
    order = sorted(range(len(blocks)), key=lambda i: lengths[i])
    rows = blocks.__getitems__(order)
    collate = CachedCollator()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    try:
        for start in range(0, len(order), batch_size):
            batch = collate(rows[start : start + batch_size])
            if batch["labels"].shape[1] < 2:
                continue
            logits = model(
                hidden_states=batch["hidden_states"].to(device), attention_mask=batch["attention_mask"].to(device)
            ).logits
            nll, tokens = shifted_nll(logits, batch["labels"])
            total_nll += nll
            total_tokens += tokens
    finally:
        model.train(was_training)
    result: dict[str, float] = perplexity_from_nll(total_nll, total_tokens)
    result["num_examples"] = len(blocks)
    result["num_batches"] = math.ceil(len(blocks) / batch_size)
    return result
