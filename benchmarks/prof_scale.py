"""cProfile of one streaming aggregation over the synthetic federation of ``bench_scale.py`` (issue 25).

Loads the first K uploads of a cache folder written by ``bench_scale.py`` and profiles
``bench_scale.aggregate_files`` (the round's one pass: ``add`` with ``one_pass=True`` every file, ``settle``,
``result``; two more passes when someone is capped or clipped) for one method; ``<method>-sketch`` profiles the
FlexLoRA methods with ``svd="sketch"``. Prints the warm read time
of the same files, the aggregation time and the top functions by own time. Run it with one thread, as every figure
of this project's shared machine is taken:

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD nice -n 10 python benchmarks/prof_scale.py 256 flexlora_held
    OMP_NUM_THREADS=1 PYTHONPATH=$PWD nice -n 10 python benchmarks/prof_scale.py 256 flexlora_held-sketch
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_scale  # noqa: E402

from peft_hetlora.federated import Coordinator, LocalStore  # noqa: E402
from peft_hetlora.federated.aggregation.methods import register_aggregation, unregister_aggregation  # noqa: E402
from peft_hetlora.federated.aggregation.methods.flexlora import FlexLoRA, FlexLoRAHeld  # noqa: E402
from peft_hetlora.utils.constants import ADAPTER_FILE, CLIENT_FILE  # noqa: E402

DEFAULT_CACHE = Path(__file__).resolve().parent.parent / "runs" / "scale_cache" / "llama-3.2-1b-L1-r16-K1024"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("clients", type=int, help="K: the first K uploads of the cache")
    parser.add_argument("method", help="a registered method, or flexlora-sketch / flexlora_held-sketch")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="a folder bench_scale.py wrote")
    parser.add_argument("--top", type=int, default=18, help="functions to list")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    store = LocalStore(args.cache)
    coord = Coordinator(store, progress=False)
    ids = sorted(store.list_client_uploads(0))[: args.clients]
    folders = [Path(store.download_client(0, c)) for c in ids]
    paths = [f / ADAPTER_FILE for f in folders]
    metas = [json.loads((f / CLIENT_FILE).read_text()) for f in folders]
    previous = load_file(str(Path(store.get_global(0).path) / ADAPTER_FILE))
    start = time.perf_counter()
    bench_scale.read_floor(paths)
    print(f"read warm {time.perf_counter() - start:.3f} s")
    method = args.method
    custom = None
    if method.endswith("-sketch"):
        custom = f"prof_{method}"
        cls = FlexLoRAHeld if method.startswith("flexlora_held") else FlexLoRA
        register_aggregation(custom, cls(svd="sketch"))
        method = custom
    try:
        profile = cProfile.Profile()
        start = time.perf_counter()
        profile.enable()
        bench_scale.aggregate_files(method, paths, metas, coord.r_max, coord.scaling, previous)
        profile.disable()
        print(f"aggregation {time.perf_counter() - start:.3f} s")
    finally:
        if custom is not None:
            unregister_aggregation(custom)
    pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
