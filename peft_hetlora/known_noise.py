"""Warnings that look like errors but are not, silenced exactly where peft-hetlora triggers them.

Each filter names one message of one library, is active only inside the project's own call that
triggers it, and says why; nothing is filtered globally.

- transformers 5 deprecates `PreTrainedModel.is_gradient_checkpointing` (FutureWarning) and PEFT's
  `PeftModel.__init__` still reads it, so every `get_peft_model` call warns about code neither the
  user nor this project wrote (`peft_model_warnings`).

The other notices are fixed at their cause: `hetlora init` saves the initial adapter with
`save_embedding_layers=False` (PEFT otherwise asks the Hub whether the base's vocabulary changed:
"Unable to fetch remote file" offline), `get_federated_model` lets PEFT record the loaded base's own path
(no "`base_model_name_or_path` was renamed" notice), and `import peft_hetlora` drops bitsandbytes'
"Failed to load CPU gemm_4bit_forward" line (its fallback kernel is what runs).

Example:
    ```py
    >>> import warnings
    >>> with peft_model_warnings():
    ...     warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
    ```
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

__all__ = ["peft_model_warnings"]


@contextlib.contextmanager
def peft_model_warnings() -> Iterator[None]:
    """Inside: transformers' `is_gradient_checkpointing` FutureWarning (read by PEFT, not by us) is not shown.

    Example:
        ```py
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as seen, peft_model_warnings():
        ...     warnings.simplefilter("always")
        ...     warnings.warn("another warning", UserWarning)
        >>> [str(w.message) for w in seen]  # every other warning still shows
        ['another warning']
        ```
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield
