"""One federated client trained by several processes (run by tests/test_multiprocess_client.py under torchrun).

    torchrun --standalone --nproc_per_node 2 tests/multiprocess_client.py --folder F --out O \
        [--hub-endpoint URL --hub-repo org/fed --hub-token TOKEN]

Trains client `alice` on the folder store `F` (and `bob` on the Hub store when given) for one round with the tiny
Llama, counting each process's `upload_client` calls; each process writes `O/rank<k>.json`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peft import get_peft_model_state_dict  # noqa: E402
from transformers import Trainer  # noqa: E402

from peft_hetlora.federated.stores import LocalStore  # noqa: E402
from tests.test_callbacks import make_args, make_dataset, make_model  # noqa: E402
from trainer_callbacks import FederatedClientCallback, run_client_rounds  # noqa: E402


def counting(store):
    """`store` whose `upload_client` calls are counted in `store.upload_calls`."""
    upload = store.upload_client
    store.upload_calls = 0

    def upload_client(*args, **kwargs):
        store.upload_calls += 1
        return upload(*args, **kwargs)

    store.upload_client = upload_client
    return store


def train_one_round(store, client_id: str, out: Path) -> dict:
    model = make_model(rank=4, seed=11)
    callback = FederatedClientCallback(store, client_id)
    args = make_args(out / client_id, max_steps=2, per_device_train_batch_size=2)
    trainer = Trainer(model=model, args=args, train_dataset=make_dataset(n=16), callbacks=[callback])
    trained = run_client_rounds(trainer, callback, max_rounds=1, sleep=lambda s: None)
    weights = get_peft_model_state_dict(model)
    digest = hashlib.sha256(b"".join(weights[k].detach().contiguous().numpy().tobytes() for k in sorted(weights)))
    return {
        "trained": trained,
        "upload_calls": store.upload_calls,
        "uploads_seen_after_train": store.list_client_uploads(0),  # after the barrier: the main upload landed
        "adapter_sha256": digest.hexdigest(),
        "uploaded_rounds": callback.uploaded_rounds,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--folder", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--hub-endpoint")
    parser.add_argument("--hub-repo")
    parser.add_argument("--hub-token")
    options = parser.parse_args()
    out = Path(options.out)
    report = {"alice": train_one_round(counting(LocalStore(options.folder)), "alice", out)}
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    report["world_size"] = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if options.hub_endpoint:
        from peft_hetlora.federated.stores import HubStore

        hub = HubStore(options.hub_repo, endpoint=options.hub_endpoint, token=options.hub_token,
                       cache_dir=out / f"hf-cache-{rank}")
        report["bob"] = train_one_round(counting(hub), "bob", out)
    (out / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
