"""Client corpora: partitioning by owner, held-out owners, errors, and tokenisation for causal LM."""

import importlib.util
import json

import datasets
import pytest
import torch

from hetlora_bench.data import (
    CausalLMCollator,
    FederatedCorpus,
    chitchat_examples,
    load_client_corpus,
    tokenize_for_clm,
)

HAS_CHITCHAT = importlib.util.find_spec("chitchat_dataset") is not None
needs_chitchat = pytest.mark.skipif(not HAS_CHITCHAT, reason="pip install chitchat-dataset")

WORDS = "hello world how are you doing today fine thanks a b c d e f g h i j k".split()


@pytest.fixture(scope="module")
def word_tokenizer():
    """A tiny word-level tokenizer (no download): [PAD]=0, [UNK]=1, [EOS]=2, then WORDS."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]")


def owner_dataset(sizes: dict[str, int]) -> datasets.Dataset:
    rows = {"user": [], "message": [], "extra": []}
    for owner, n in sizes.items():
        for i in range(n):
            rows["user"].append(owner)
            rows["message"].append(f"{owner} says {WORDS[i % len(WORDS)]} {i}")
            rows["extra"].append(i)
    return datasets.Dataset.from_dict(rows)


def texts(corpus: FederatedCorpus) -> dict:
    return {
        "clients": {k: list(v["text"]) for k, v in corpus.clients.items()},
        "validation": {k: list(v["text"]) for k, v in corpus.validation.items()},
        "eval": list(corpus.eval["text"]),
        "heldout": corpus.heldout_clients,
    }


# ------------------------------------------------------------------------------------------------ chitchat


@pytest.fixture(scope="module")
def chitchat_corpus():
    return load_client_corpus("chitchat", num_clients=8, min_examples=20, seed=3, max_eval_examples=300)


@needs_chitchat
def test_chitchat_partition_is_deterministic_and_disjoint(chitchat_corpus):
    again = load_client_corpus("chitchat", num_clients=8, min_examples=20, seed=3, max_eval_examples=300)
    assert texts(again) == texts(chitchat_corpus)
    other = load_client_corpus("chitchat", num_clients=8, min_examples=20, seed=4, max_eval_examples=300)
    assert set(other.clients) != set(chitchat_corpus.clients)

    corpus = chitchat_corpus
    assert len(corpus.clients) == 8
    assert set(corpus.clients) == set(corpus.validation)
    assert not set(corpus.heldout_clients) & set(corpus.clients)
    assert set(corpus.eval["client_id"]) <= set(corpus.heldout_clients)
    # every held-out sender appears in the (capped) evaluation set: round-robin interleaving
    assert set(corpus.eval["client_id"]) == set(corpus.heldout_clients)
    assert len(corpus.eval) == 300
    # the filter: each client had >= min_examples turns; each keeps >= 1 validation example
    for cid in corpus.clients:
        assert len(corpus.clients[cid]) + len(corpus.validation[cid]) >= 20
        assert len(corpus.validation[cid]) >= 1
    # sources map back to distinct senders; held-out fraction of eligible senders
    sources = [corpus.client_sources[c] for c in [*corpus.clients, *corpus.heldout_clients]]
    assert len(set(sources)) == len(sources)
    info = corpus.info
    assert info["num_heldout"] == max(1, round(0.1 * info["eligible_clients"]))
    assert info["owners"] == 1315


@needs_chitchat
def test_chitchat_examples_format_and_sender_texts(chitchat_corpus):
    by_sender = chitchat_examples()
    cid = chitchat_corpus.client_ids[0]
    sender = chitchat_corpus.client_sources[cid]
    client_texts = list(chitchat_corpus.clients[cid]["text"]) + list(chitchat_corpus.validation[cid]["text"])
    assert sorted(client_texts) == sorted(by_sender[sender])
    for text in client_texts:
        assert text.startswith(("A: ", "B: "))
        assert "\nB: " in text or text.startswith("B: ")
    assert sum(len(v) for v in by_sender.values()) > 130_000


@needs_chitchat
def test_chitchat_too_many_clients_message():
    with pytest.raises(ValueError, match=r"only \d+ owners.*min_examples=200"):
        load_client_corpus("chitchat", num_clients=500, min_examples=200)


# ------------------------------------------------------------------------------------------------ generic


def test_generic_dataset_partition_filter_and_determinism():
    data = owner_dataset({"alice": 12, "bob": 3, "carol": 10, "dave": 9, "erin": 15, "frank": 11})
    kwargs = {"client_column": "user", "text_column": "message", "min_examples": 9, "num_heldout": 1, "seed": 1}
    corpus = load_client_corpus(data, **kwargs)
    assert texts(corpus) == texts(load_client_corpus(data, **kwargs))
    everyone = set(corpus.clients) | set(corpus.heldout_clients)
    assert everyone == {"alice", "carol", "dave", "erin", "frank"}  # bob filtered out (3 < 9)
    assert len(corpus.heldout_clients) == 1 and corpus.heldout_clients[0] not in corpus.clients
    for cid, ds in corpus.clients.items():
        val = corpus.validation[cid]
        assert set(ds["text"]).isdisjoint(val["text"])
        assert all(t.startswith(f"{cid} says") for t in list(ds["text"]) + list(val["text"]))
        n = len(ds) + len(val)
        assert len(val) == max(1, round(0.1 * n))
    heldout_rows = data.filter(lambda r: r["user"] == corpus.heldout_clients[0])
    assert sorted(corpus.eval["text"]) == sorted(heldout_rows["message"])
    assert corpus.num_examples() == {cid: len(ds) for cid, ds in corpus.clients.items()}
    assert "4 clients" in corpus.summary()


def test_generic_num_clients_and_errors():
    data = owner_dataset({"a": 5, "b": 5, "c": 5, "d": 2})
    corpus = load_client_corpus(data, client_column="user", text_column="message", min_examples=5, num_clients=2,
                                num_heldout=1)
    assert len(corpus.clients) == 2
    with pytest.raises(ValueError) as err:
        load_client_corpus(data, client_column="user", text_column="message", min_examples=5, num_clients=3,
                           num_heldout=1)
    message = str(err.value)
    assert "Asked for 3 clients but only 2" in message and "min_examples=5" in message and "3 of 4 owners" in message
    with pytest.raises(KeyError) as err:
        load_client_corpus(data, client_column="speaker", text_column="message")
    assert "'speaker'" in str(err.value) and "['user', 'message', 'extra']" in str(err.value)
    with pytest.raises(KeyError, match="available columns"):
        load_client_corpus(data, client_column="user", text_column="body")
    with pytest.raises(FileNotFoundError, match="load_dataset"):
        load_client_corpus("/nonexistent/folder", client_column="user", text_column="message")


def test_generic_split_column_and_odd_client_ids(tmp_path):
    rows = {"who": [], "text": [], "split": []}
    for owner in ["user 1/x", "user 2/y", 7]:
        for i in range(6):
            rows["who"].append(str(owner))
            rows["text"].append(f"{owner} text {i}")
            rows["split"].append("test" if i >= 4 else "train")
    data = datasets.Dataset.from_dict(rows)
    folder = tmp_path / "saved"
    data.save_to_disk(str(folder))
    corpus = load_client_corpus(str(folder), client_column="who", split_column="split", min_examples=6,
                                num_heldout=0)
    assert len(corpus.clients) == 3 and len(corpus.eval) == 0
    for cid, ds in corpus.clients.items():
        assert len(ds) == 4 and len(corpus.validation[cid]) == 2
        assert all(" text 4" in t or " text 5" in t for t in list(corpus.validation[cid]["text"]))
        assert datasets_id_ok(cid)
    assert sorted(corpus.client_sources.values()) == ["7", "user 1/x", "user 2/y"]
    bad = data.map(lambda r: {"split": "holdout"})
    with pytest.raises(ValueError, match="'holdout'"):
        load_client_corpus(bad, client_column="who", split_column="split", min_examples=1, num_heldout=0)


def test_load_dataset_args_spec(tmp_path):
    path = tmp_path / "chats.jsonl"
    with path.open("w") as f:
        for owner in "pq":
            for i in range(4):
                f.write(json.dumps({"client_id": owner, "text": f"hello {owner} {i}"}) + "\n")
    corpus = load_client_corpus({"path": "json", "data_files": str(path), "split": "train"}, min_examples=4,
                                num_heldout=1, seed=0)
    assert len(corpus.clients) == 1 and len(corpus.heldout_clients) == 1 and len(corpus.eval) == 4


def datasets_id_ok(cid: str) -> bool:
    import re

    return bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", cid)) and ".." not in cid


# ------------------------------------------------------------------------------------------------ tokenisation


def test_tokenize_labels_padding_truncation(word_tokenizer):
    ds = datasets.Dataset.from_dict({"text": ["hello world", "how are you doing today fine thanks a b c", "x", ""]})
    out = tokenize_for_clm(ds, word_tokenizer, block_size=6)
    assert out.column_names == ["input_ids", "attention_mask", "labels"]
    assert len(out) == 3  # "x" -> [UNK] [EOS] is kept; "" -> [EOS] alone has nothing to predict and is dropped
    first = out[0]
    assert first["input_ids"] == [3, 4, 2, 0, 0, 0]  # hello world [EOS] + padding
    assert first["attention_mask"] == [1, 1, 1, 0, 0, 0]
    assert first["labels"] == [3, 4, 2, -100, -100, -100]
    second = out[1]
    assert second["input_ids"] == [5, 6, 7, 8, 9, 10]  # truncated to block_size, EOS cut away
    assert second["labels"] == second["input_ids"]


def test_tokenize_keeps_rows_with_two_tokens_and_drops_shorter(word_tokenizer):
    ds = datasets.Dataset.from_dict({"text": ["x", ""]})
    out = tokenize_for_clm(ds, word_tokenizer, block_size=4)
    assert list(out["input_ids"]) == [[1, 2, 0, 0]]  # [UNK, EOS] kept; "" has only EOS: nothing to predict
    unpadded = tokenize_for_clm(ds, word_tokenizer, block_size=4, pad_to_block_size=False, add_eos=False)
    assert len(unpadded) == 0


def test_tokenize_packing_keeps_every_token(word_tokenizer):
    sentences = ["hello world", "how are you", "doing today fine thanks", "a b c d e"]
    ds = datasets.Dataset.from_dict({"text": sentences})
    out = tokenize_for_clm(ds, word_tokenizer, block_size=5, packing=True)
    stream = []
    for s in sentences:
        stream += word_tokenizer(s)["input_ids"] + [2]
    real = [t for ids, m in zip(list(out["input_ids"]), list(out["attention_mask"])) for t, k in zip(ids, m) if k]
    assert real == stream
    assert all(len(ids) == 5 for ids in list(out["input_ids"]))
    assert list(out["labels"])[-1][-1] == -100 or len(stream) % 5 == 0


def test_tokenize_cache_and_collator(word_tokenizer):
    ds = datasets.Dataset.from_dict({"text": ["hello world", "how are you doing"]})
    a = tokenize_for_clm(ds, word_tokenizer, block_size=8, pad_to_block_size=False)
    assert tokenize_for_clm(ds, word_tokenizer, block_size=8, pad_to_block_size=False) is a
    assert tokenize_for_clm(ds, word_tokenizer, block_size=7, pad_to_block_size=False) is not a
    assert [len(x) for x in list(a["input_ids"])] == [3, 5]
    batch = CausalLMCollator(pad_token_id=0)(list(a))
    assert batch["input_ids"].dtype == torch.long
    assert batch["input_ids"].tolist() == [[3, 4, 2, 0, 0], [5, 6, 7, 8, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[3, 4, 2, -100, -100], [5, 6, 7, 8, 2]]
    with pytest.raises(KeyError, match="available columns"):
        tokenize_for_clm(ds, word_tokenizer, block_size=8, text_column="body")


def test_tokenize_empty_dataset_keeps_columns(word_tokenizer):
    empty = datasets.Dataset.from_dict({"text": []}, features=datasets.Features({"text": datasets.Value("string")}))
    for packing in (False, True):
        out = tokenize_for_clm(empty, word_tokenizer, block_size=8, packing=packing)
        assert len(out) == 0 and out.column_names == ["input_ids", "attention_mask", "labels"]
