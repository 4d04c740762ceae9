"""Run this Flower App as a local simulation from Python, without a SuperLink (`flwr.simulation.run_simulation`).

Settings come from ``[tool.flwr.app.config]`` in pyproject.toml (``flwr run`` can override them with --run-config).

Usage::

    python simulate.py --nodes 10            # 10 virtual SuperNodes, 1 CPU each
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from client_app import app as client_app  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402
from server_app import app as server_app  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=10, help="virtual SuperNodes (one client each)")
    parser.add_argument("--cpus-per-client", type=float, default=1.0)
    parser.add_argument("--gpus-per-client", type=float, default=0.0)
    args = parser.parse_args()
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=args.nodes,
        backend_config={
            "client_resources": {"num_cpus": args.cpus_per_client, "num_gpus": args.gpus_per_client},
            "init_args": {"num_cpus": os.cpu_count()},
        },
    )


if __name__ == "__main__":
    main()
