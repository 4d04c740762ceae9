"""The Flower configuration the docs give keeps `flwr run .` (local simulation) working beside the deployment."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "flower" / "flwr-config.toml"


def test_docs_and_example_readme_show_the_whole_file():
    text = CONFIG.read_text().strip()
    for doc in (ROOT / "docs" / "flower.md", ROOT / "examples" / "flower" / "README.md"):
        assert text in doc.read_text(), f"{doc} must show {CONFIG.name} whole"


def test_flower_reads_both_connections(tmp_path, monkeypatch):
    pytest.importorskip("flwr")
    from flwr.cli.flower_config import read_superlink_connection

    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    (tmp_path / "config.toml").write_text(CONFIG.read_text())
    local = read_superlink_connection(None)  # what `flwr run .` uses
    assert local.name == "local" and local.options.num_supernodes == 10
    deployment = read_superlink_connection("hetlora")
    assert deployment.address == "superlink.example.org:8000" and deployment.root_certificates.endswith("ca.crt")
    # the deployment block alone, as the docs used to show it, leaves `flwr run .` without a connection
    (tmp_path / "config.toml").write_text(CONFIG.read_text().split("# deployment")[1].split("\n", 1)[1])
    with pytest.raises(Exception, match="No SuperLink connection set"):
        read_superlink_connection(None)
