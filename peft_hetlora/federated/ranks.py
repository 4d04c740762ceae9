"""Re-export of `peft_hetlora.utils.ranks` (the one rank check), kept so existing imports work.

New code imports from `peft_hetlora.utils.ranks`; this module goes when the federated core is regrouped.

Example:
    ```py
    >>> check_rank(4, 1, 16)
    4
    ```
"""

from __future__ import annotations

from ..utils.ranks import MAX_RANK, RankError, RankTypeError, check_rank, is_rank

__all__ = ["MAX_RANK", "RankError", "RankTypeError", "check_rank", "is_rank"]
