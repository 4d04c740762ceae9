"""PEFT's saved key names for the aggregation tests (privacy, secure sum, robust): one place for the format.

Example:
    ```py
    >>> ak("layers.0.q_proj"), bk("layers.0.q_proj")
    ('layers.0.q_proj.lora_A.weight', 'layers.0.q_proj.lora_B.weight')
    ```
"""

from __future__ import annotations

EXTRA = "score.modules_to_save.weight"


def ak(name: str) -> str:
    """The lora_A key of module `name`."""
    return f"{name}.lora_A.weight"


def bk(name: str) -> str:
    """The lora_B key of module `name`."""
    return f"{name}.lora_B.weight"
