"""Re-export of `peft_hetlora.utils.untrusted_text` (client text made safe to show), kept so imports work.

New code imports from `peft_hetlora.utils.untrusted_text`; this module goes when the federated core is regrouped.

Example:
    ```py
    >>> one_line("bad\\nINFO forged line")
    'bad INFO forged line'
    ```
"""

from __future__ import annotations

from ..utils.untrusted_text import DEFAULT_LIMIT, ELLIPSIS, brief, markdown_text, one_line

__all__ = ["DEFAULT_LIMIT", "ELLIPSIS", "brief", "markdown_text", "one_line"]
