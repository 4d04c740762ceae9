"""Federated client corpora: one client per natural data owner, plus held-out owners for evaluation.

The default corpus is the Chit Chat Challenge dataset (PyPI ``chitchat-dataset``, MIT licence): 7,168 real
two-person conversations, 258,145 utterances grouped into 138,737 turns by 1,315 senders. Partitioning by
sender gives a natural non-IID federation: every client is one person, with their own style and topics.

Chitchat example format (one example per turn of the client's sender)::

    A: <the other person's previous turn>
    B: <the sender's turn>

A turn is the sender's consecutive utterances joined by spaces (the package's own convention). The previous
turn gives the reply a context, which makes it a conversational language-modelling task rather than
isolated sentences; the loss covers the whole example (the same code for every method). The context keeps
only the last ``context_chars`` characters of the previous turn (cut at a word boundary), so long
contexts do not crowd the reply out of the token block. A conversation's first turn has no ``A:`` line.

Evaluation uses **held-out senders** (people no client represents), drawn with the seed from the eligible
senders; every client also keeps a local validation split. Everything is deterministic given the seed.

Any other ``datasets`` dataset works through :func:`load_client_corpus` with ``client_column`` and
``text_column`` (and optionally ``split_column``), loaded from a dict of :func:`datasets.load_dataset`
arguments, a folder written by ``save_to_disk``, or a ``Dataset`` object.

Example:
    >>> corpus = load_client_corpus("chitchat", num_clients=20, seed=0)
    >>> len(corpus.clients)
    20
    >>> from transformers import AutoTokenizer
    >>> from peft_hetlora.model_source import resolve_tokenizer
    >>> tokenizer = AutoTokenizer.from_pretrained(resolve_tokenizer())
    >>> train = tokenize_for_clm(corpus.clients[corpus.client_ids[0]], tokenizer, block_size=128)
    >>> train.column_names
    ['input_ids', 'attention_mask', 'labels']
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from .clm_tokens import (  # noqa: F401  (re-exported: callers import these from data)
    CausalLMCollator,
    clear_tokenization_cache,
    corpus_token_stats,
    pad_token_id,
    tokenize_for_clm,
)
from .pycode import PYCODE, pycode_examples

CHITCHAT = "chitchat"
_CLIENT_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_TRAIN_SPLITS = {"train", "training"}
_VALIDATION_SPLITS = {"validation", "valid", "val", "dev", "test", "eval", "evaluation"}


@dataclass
class FederatedCorpus:
    """The text of a federation: clients' train / validation splits and held-out clients for evaluation.

    Attributes:
        clients: client id -> that client's training ``Dataset`` (column ``"text"``), in a deterministic order.
        validation: client id -> the client's local validation ``Dataset`` (column ``"text"``).
        eval: the held-out clients' ``Dataset`` (columns ``"text"`` and ``"client_id"``): data of owners that no
            client represents, for the global (unseen-owner) perplexity.
        heldout_clients: ids of the held-out owners in ``eval``.
        client_sources: client id (of clients and held-out owners) -> the original owner value (e.g. the sender
            UUID); ids are shortened / sanitised to be valid store ids.
        info: how the corpus was made (spec, filters, seed) and its counts.

    Example:
        >>> corpus = load_client_corpus("chitchat", num_clients=4, seed=0)
        >>> sorted(corpus.num_examples().values())[:1]  # doctest: +SKIP
        [21]
    """

    clients: dict[str, datasets.Dataset]
    validation: dict[str, datasets.Dataset]
    eval: datasets.Dataset
    heldout_clients: list[str] = field(default_factory=list)
    client_sources: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def client_ids(self) -> list[str]:
        """The client ids, in the corpus's deterministic order."""
        return list(self.clients)

    def num_examples(self) -> dict[str, int]:
        """Client id -> number of training examples (the data-size weight of FedAvg-style aggregation)."""
        return {cid: len(ds) for cid, ds in self.clients.items()}

    def summary(self) -> str:
        """One line describing the corpus, for logs and reports."""
        sizes = sorted(self.num_examples().values())
        median = sizes[len(sizes) // 2] if sizes else 0
        return (
            f"{self.info.get('name', 'corpus')}: {len(self.clients)} clients "
            f"(train examples min {sizes[0] if sizes else 0}, median {median}, max {sizes[-1] if sizes else 0}, "
            f"total {sum(sizes)}), {sum(len(v) for v in self.validation.values())} client validation examples, "
            f"{len(self.eval)} held-out examples from {len(self.heldout_clients)} unseen owners "
            f"({self.info.get('eligible_clients', '?')} owners with >= {self.info.get('min_examples', '?')} examples)"
        )


# ----------------------------------------------------------------------------------------------------------------
# Loading raw records
# ----------------------------------------------------------------------------------------------------------------


def chitchat_path() -> Path:
    """Path of the chitchat ``dataset.json`` inside the installed ``chitchat-dataset`` package.

    Raises:
        ModuleNotFoundError: the package is missing (``pip install chitchat-dataset``).

    Example:
        >>> chitchat_path().name
        'dataset.json'
    """
    import importlib.util

    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "The default corpus needs the PyPI package chitchat-dataset: `pip install chitchat-dataset`, or pass "
            "your own dataset with client_column / text_column.",
            name="chitchat_dataset",
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "dataset.json"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError("chitchat-dataset is installed without its dataset.json; reinstall it.")


def _tail_words(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    cut = text[-max_chars:]
    space = cut.find(" ")
    return cut[space + 1 :] if 0 <= space < len(cut) - 1 else cut


def chitchat_examples(context_chars: int = 300, path: str | os.PathLike | None = None) -> dict[str, list[str]]:
    """Sender UUID -> that sender's examples (one per turn, formatted as in the module docstring).

    Turns whose text is empty are skipped. Conversations are read in file order, so the result is deterministic.
    The parsed file is kept for the process (a fresh copy of the lists is returned each time).

    Example:
        >>> examples = chitchat_examples()
        >>> len(examples)
        1315
    """
    key = (str(path or chitchat_path()), context_chars)
    if key not in _CHITCHAT_CACHE:
        _CHITCHAT_CACHE.clear()
        _CHITCHAT_CACHE[key] = _parse_chitchat(key[0], context_chars)
    return {sender: list(texts) for sender, texts in _CHITCHAT_CACHE[key].items()}


_CHITCHAT_CACHE: dict[tuple[str, int], dict[str, list[str]]] = {}


def _parse_chitchat(path: str, context_chars: int) -> dict[str, list[str]]:
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    by_sender: dict[str, list[str]] = {}
    for conversation in raw.values():
        previous: str | None = None
        for message in conversation["messages"]:
            if not message:
                continue
            sender = message[0]["sender"]
            turn = " ".join(u["text"].strip() for u in message if u["text"].strip())
            if not turn:
                continue
            if previous is None or context_chars <= 0:
                text = f"B: {turn}"
            else:
                text = f"A: {_tail_words(previous, context_chars)}\nB: {turn}"
            by_sender.setdefault(sender, []).append(text)
            previous = turn
    return by_sender


def _load_generic(spec: Any) -> datasets.Dataset:
    if isinstance(spec, datasets.Dataset):
        return spec
    if isinstance(spec, datasets.DatasetDict):
        return _pick_split(spec, "the given DatasetDict")
    if isinstance(spec, Mapping):
        loaded = datasets.load_dataset(**dict(spec))
        if isinstance(loaded, datasets.DatasetDict):
            return _pick_split(loaded, f"load_dataset(**{dict(spec)!r})")
        if not isinstance(loaded, datasets.Dataset):
            raise TypeError(
                f"load_dataset(**{dict(spec)!r}) gave a {type(loaded).__name__}; use a non-streaming dataset."
            )
        return loaded
    path = Path(os.fspath(spec)).expanduser()
    if path.is_dir():
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            loaded = datasets.load_from_disk(str(path))
        else:
            loaded = datasets.load_dataset(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            return _pick_split(loaded, str(path))
        return loaded
    raise FileNotFoundError(
        f"Data spec {str(spec)!r} is not {CHITCHAT!r}, a folder (save_to_disk or data files), a dict of "
        f"datasets.load_dataset arguments (e.g. {{'path': 'json', 'data_files': 'chats.jsonl', 'split': 'train'}}) "
        f"or a datasets.Dataset."
    )


def _pick_split(dataset_dict: datasets.DatasetDict, where: str) -> datasets.Dataset:
    if len(dataset_dict) == 1:
        return next(iter(dataset_dict.values()))
    if "train" in dataset_dict:
        return dataset_dict["train"]
    raise ValueError(
        f"{where} has several splits {list(dataset_dict)} and none is 'train'; choose one with split=... in the "
        f"load_dataset arguments (held-out evaluation uses held-out clients, not a split)."
    )


def _generic_examples(
    dataset: datasets.Dataset, client_column: str, text_column: str, split_column: str | None
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Owner value -> train texts, owner value -> validation texts (validation empty unless split_column)."""
    columns = list(dataset.column_names)
    for role, name in (("client_column", client_column), ("text_column", text_column), ("split_column", split_column)):
        if name is not None and name not in columns:
            raise KeyError(f"{role}={name!r} is not a column of the dataset; available columns: {columns}.")
    owners = list(dataset[client_column])
    texts = list(dataset[text_column])
    splits = list(dataset[split_column]) if split_column is not None else None
    train: dict[str, list[str]] = {}
    validation: dict[str, list[str]] = {}
    for i, (owner, text) in enumerate(zip(owners, texts)):
        if owner is None or text is None or not str(text).strip():
            continue
        key = str(owner)
        if splits is None:
            train.setdefault(key, []).append(str(text))
            continue
        split = str(splits[i]).lower()
        if split in _TRAIN_SPLITS:
            train.setdefault(key, []).append(str(text))
        elif split in _VALIDATION_SPLITS:
            validation.setdefault(key, []).append(str(text))
        else:
            raise ValueError(
                f"split_column={split_column!r} has the value {splits[i]!r}; use one of {sorted(_TRAIN_SPLITS)} for "
                f"training rows and one of {sorted(_VALIDATION_SPLITS)} for local validation rows."
            )
    for key in validation:
        train.setdefault(key, [])
    return train, validation


# ----------------------------------------------------------------------------------------------------------------
# Partitioning
# ----------------------------------------------------------------------------------------------------------------


def _client_ids(owners: Sequence[str], shorten_uuids: bool) -> dict[str, str]:
    """Owner value -> a store-safe client id (``[A-Za-z0-9][A-Za-z0-9_.-]{0,63}``), unique and deterministic."""
    ids: dict[str, str] = {}
    used: set[str] = set()
    if shorten_uuids:
        short = [o.replace("-", "")[:8] for o in owners]
        if len(set(short)) == len(short) and all(_CLIENT_ID_PATTERN.match(s) for s in short):
            return dict(zip(owners, short))
    for owner in owners:
        if _CLIENT_ID_PATTERN.match(owner) and ".." not in owner:
            candidate = owner
        else:
            clean = re.sub(r"[^A-Za-z0-9_.-]+", "_", owner).strip("._-").replace("..", "_")[:48] or "client"
            candidate = f"{clean}-{hashlib.sha1(owner.encode()).hexdigest()[:8]}"
            if not _CLIENT_ID_PATTERN.match(candidate):
                candidate = f"c{candidate}"[:64]
        base, n = candidate, 1
        while candidate in used:
            n += 1
            candidate = f"{base[:58]}-{n}"
        used.add(candidate)
        ids[owner] = candidate
    return ids


def _split_validation(texts: list[str], val_fraction: float, rng: random.Random) -> tuple[list[str], list[str]]:
    order = list(range(len(texts)))
    rng.shuffle(order)
    if val_fraction <= 0 or len(texts) < 2:
        n_val = 0
    else:
        n_val = min(len(texts) - 1, max(1, round(val_fraction * len(texts))))
    val_idx = sorted(order[:n_val])
    train_idx = sorted(order[n_val:])
    return [texts[i] for i in train_idx], [texts[i] for i in val_idx]


def _round_robin(groups: list[list[str]], owners: list[str], limit: int | None) -> tuple[list[str], list[str]]:
    """Interleave the held-out owners' (already shuffled) examples so a cap keeps every owner represented."""
    texts: list[str] = []
    who: list[str] = []
    depth = 0
    while any(depth < len(g) for g in groups):
        for group, owner in zip(groups, owners):
            if depth < len(group):
                if limit is not None and len(texts) >= limit:
                    return texts, who
                texts.append(group[depth])
                who.append(owner)
        depth += 1
    return texts, who


def load_client_corpus(
    spec: str | os.PathLike | Mapping[str, Any] | datasets.Dataset | None = CHITCHAT,
    *,
    num_clients: int | None = None,
    min_examples: int = 20,
    heldout_fraction: float = 0.1,
    num_heldout: int | None = None,
    val_fraction: float = 0.1,
    max_examples_per_client: int | None = None,
    max_eval_examples: int | None = 2000,
    client_column: str = "client_id",
    text_column: str = "text",
    split_column: str | None = None,
    context_chars: int = 300,
    seed: int = 0,
) -> FederatedCorpus:
    """Partition a corpus into federated clients (one per data owner) and held-out owners for evaluation.

    Steps (all seeded, so the same arguments give the same corpus):

    1. one list of examples per owner (chitchat: per sender, see the module docstring; generic: rows grouped by
       ``client_column``, text from ``text_column``);
    2. keep owners with at least ``min_examples`` examples (the *eligible* owners), shuffle them with ``seed``;
    3. the first ``num_heldout`` (default ``max(1, round(heldout_fraction * eligible))``) become held-out owners,
       whose examples form ``eval`` (interleaved across owners and capped at ``max_eval_examples``);
    4. the next ``num_clients`` (default: all the rest) become clients; each keeps ``val_fraction`` of its
       examples (at least 1 when it has 2 or more) as local validation, or, with ``split_column``, the rows
       marked as validation / test. ``max_examples_per_client`` caps a client's examples (seeded sample).

    Args:
        spec: ``"chitchat"`` (default), ``"pycode"`` (Python source by installed package, see
            :mod:`hetlora_bench.pycode`), a folder (``save_to_disk`` output or data files), a dict of
            ``datasets.load_dataset`` arguments, or a ``datasets.Dataset``.
        num_clients: how many clients to make (``ValueError`` if fewer owners are eligible).
        min_examples: the smallest number of examples an owner needs to be eligible (client or held-out).

    Raises:
        KeyError: a named column is missing (the message lists the available columns).
        ValueError: fewer eligible owners than asked (the message gives the counts and the filter).

    Example:
        >>> corpus = load_client_corpus("chitchat", num_clients=20, min_examples=20, seed=0)
        >>> corpus.eval.column_names
        ['text', 'client_id']
        >>> own = load_client_corpus({"path": "json", "data_files": "chats.jsonl", "split": "train"},
        ...                          client_column="user", text_column="message")  # doctest: +SKIP
    """
    if not 0 <= heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}.")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    if min_examples < 1:
        raise ValueError(f"min_examples must be >= 1, got {min_examples}.")

    if spec is None or (isinstance(spec, str) and spec.lower() == CHITCHAT):
        name = CHITCHAT
        per_owner = chitchat_examples(context_chars=context_chars)
        preset_validation: dict[str, list[str]] = {}
        shorten = True
        if split_column is not None:
            raise ValueError("split_column applies to generic datasets; chitchat makes its own validation split.")
    elif isinstance(spec, str) and spec.lower() == PYCODE:
        if split_column is not None:
            raise ValueError("split_column applies to generic datasets; pycode makes its own validation split.")
        name = PYCODE
        code = pycode_examples()
        per_owner = {owner: list(blocks) for owner, blocks in code.items()}
        preset_validation = {}
        shorten = False
    else:
        name = (
            str(spec.get("path", "dataset"))
            if isinstance(spec, Mapping)
            else ("dataset" if isinstance(spec, (datasets.Dataset, datasets.DatasetDict)) else str(spec))
        )
        dataset = _load_generic(spec)
        per_owner, preset_validation = _generic_examples(dataset, client_column, text_column, split_column)
        shorten = False

    def size(owner: str) -> int:
        return len(per_owner.get(owner, [])) + len(preset_validation.get(owner, []))

    owners = sorted(per_owner)
    eligible = [o for o in owners if size(o) >= min_examples and per_owner.get(o)]
    rng = random.Random(f"peft_hetlora-corpus-{seed}")
    rng.shuffle(eligible)
    n_heldout = (
        num_heldout
        if num_heldout is not None
        else (max(1, round(heldout_fraction * len(eligible))) if heldout_fraction > 0 else 0)
    )
    if n_heldout < 0:
        raise ValueError(f"num_heldout must be >= 0, got {n_heldout}.")
    available = len(eligible) - n_heldout
    wanted = num_clients if num_clients is not None else available
    if wanted < 1 or available < wanted:
        counts = ", ".join(
            f">= {m}: {sum(1 for o in owners if size(o) >= m and per_owner.get(o))}"
            for m in sorted({1, 5, 10, min_examples, 50})
        )
        raise ValueError(
            f"Asked for {wanted} clients but only {max(available, 0)} owners are left: {len(eligible)} of "
            f"{len(owners)} owners ({client_column if name != CHITCHAT else 'sender'}) have at least "
            f"min_examples={min_examples} examples, and {n_heldout} of them are held out for evaluation. Lower "
            f"num_clients, min_examples or heldout_fraction (owners by number of examples: {counts})."
        )
    heldout = eligible[:n_heldout]
    chosen = eligible[n_heldout : n_heldout + wanted]
    ids = _client_ids(heldout + chosen, shorten_uuids=shorten)

    clients: dict[str, datasets.Dataset] = {}
    validation: dict[str, datasets.Dataset] = {}
    for owner in chosen:
        cid = ids[owner]
        client_rng = random.Random(f"peft_hetlora-client-{seed}-{owner}")
        texts = list(per_owner[owner])
        preset = list(preset_validation.get(owner, []))
        if max_examples_per_client is not None and len(texts) + len(preset) > max_examples_per_client:
            keep_val = min(len(preset), round(max_examples_per_client * len(preset) / (len(texts) + len(preset))))
            keep_train = max_examples_per_client - keep_val
            texts = [texts[i] for i in sorted(client_rng.sample(range(len(texts)), keep_train))]
            preset = [preset[i] for i in sorted(client_rng.sample(range(len(preset)), keep_val))]
        if split_column is not None:
            train_texts, val_texts = texts, preset
        else:
            train_texts, val_texts = _split_validation(texts, val_fraction, client_rng)
        clients[cid] = datasets.Dataset.from_dict({"text": train_texts})
        validation[cid] = datasets.Dataset.from_dict(
            {"text": val_texts}, features=datasets.Features({"text": datasets.Value("string")})
        )

    groups = []
    for owner in heldout:
        texts = list(per_owner[owner]) + list(preset_validation.get(owner, []))
        random.Random(f"peft_hetlora-heldout-{seed}-{owner}").shuffle(texts)
        groups.append(texts)
    eval_texts, eval_owner = _round_robin(groups, [ids[o] for o in heldout], max_eval_examples)
    eval_dataset = datasets.Dataset.from_dict(
        {"text": eval_texts, "client_id": eval_owner},
        features=datasets.Features({"text": datasets.Value("string"), "client_id": datasets.Value("string")}),
    )

    info = {
        "name": name,
        "seed": seed,
        "min_examples": min_examples,
        "owners": len(owners),
        "eligible_clients": len(eligible),
        "num_clients": len(clients),
        "num_heldout": len(heldout),
        "heldout_fraction": heldout_fraction,
        "val_fraction": val_fraction,
        "max_examples_per_client": max_examples_per_client,
        "max_eval_examples": max_eval_examples,
        "train_examples": sum(len(d) for d in clients.values()),
        "validation_examples": sum(len(d) for d in validation.values()),
        "eval_examples": len(eval_dataset),
    }
    if name == CHITCHAT:
        info["context_chars"] = context_chars
    elif name == PYCODE:
        info["versions"] = {o: code.versions[o] for o in heldout + chosen}
    else:
        info.update(client_column=client_column, text_column=text_column, split_column=split_column)
    return FederatedCorpus(
        clients=clients,
        validation=validation,
        eval=eval_dataset,
        heldout_clients=[ids[o] for o in heldout],
        client_sources={ids[o]: o for o in heldout + chosen},
        info=info,
    )

