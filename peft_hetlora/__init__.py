"""peft-hetlora: heterogeneous-rank LoRA (HetLoRA) for federated fine-tuning, as a native PEFT method.

Importing the package registers the `HETLORA` PEFT type, so `peft.get_peft_model`,
`PeftModel.from_pretrained` and `AutoPeftModelForCausalLM` work with `HetLoRAConfig` adapters.

Example:
    ```py
    >>> import peft_hetlora
    >>> from peft import get_peft_model
    >>> config = peft_hetlora.HetLoRAConfig(r=16, rank=4, target_modules=["q_proj", "v_proj"])
    >>> model = get_peft_model(base_model, config)  # doctest: +SKIP
    ```
"""

from .config import HetLoRAConfig
from .export import export_lora
from .layer import HetLoRALinear
from .model import HetLoRAModel
from .registration import HETLORA_PEFT_TYPE, register

register()

__version__ = "0.1.0"

__all__ = ["HETLORA_PEFT_TYPE", "HetLoRAConfig", "HetLoRALinear", "HetLoRAModel", "__version__", "export_lora"]
