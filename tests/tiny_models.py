"""Tiny, randomly initialised models and helpers shared by the PEFT-side tests.

Nothing here touches the Hugging Face Hub: models are built from configs (a 2-layer Llama with the
SmolLM2 module names, a 2-layer GPT-2 whose attention/MLP layers are transformers `Conv1D`) and a
module-level toy `Linear` model is provided for exact layer-math checks.

Example:
    ```py
    >>> from tiny_models import tiny_llama, token_batch  # tests/ is on sys.path under pytest
    >>> model = tiny_llama()
    >>> model(token_batch()).logits.shape
    torch.Size([2, 8, 96])
    ```
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

#: every linear projection of a Llama decoder layer (SmolLM2's target set for "all-linear")
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: GPT-2's Conv1D projections
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]
VOCAB_SIZE = 96


def tiny_llama_config(**overrides) -> LlamaConfig:
    """A 2-layer Llama config shaped like a scaled-down SmolLM2 (GQA, SiLU MLP, tied embeddings)."""
    values = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> LlamaForCausalLM:
    """A freshly initialised tiny Llama in eval mode; the same `seed` gives the same weights."""
    torch.manual_seed(seed)
    config = tiny_llama_config(**overrides)
    config.use_cache = False
    return LlamaForCausalLM(config).to(dtype).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """A 2-layer GPT-2 (its c_attn / c_proj / c_fc are transformers `Conv1D`, i.e. fan_in_fan_out)."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    config.use_cache = False
    return GPT2LMHeadModel(config).eval()


def token_batch(batch: int = 2, length: int = 8, seed: int = 1, vocab_size: int = VOCAB_SIZE) -> torch.Tensor:
    """Deterministic random token ids of shape (batch, length)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=generator)


class TwoLinear(nn.Module):
    """Two stacked `nn.Linear` layers (with a nonlinearity): the smallest target for exact layer checks."""

    def __init__(self, d_in: int = 12, d_hidden: int = 10, d_out: int = 6, bias: bool = True) -> None:
        super().__init__()
        self.lin0 = nn.Linear(d_in, d_hidden, bias=bias)
        self.lin1 = nn.Linear(d_hidden, d_out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.tanh(self.lin0(x)))


def randomize_adapter(model: nn.Module, seed: int = 0, std: float = 0.3) -> None:
    """Fill every `lora_A` / `lora_B` weight with Gaussian noise (B starts at zero otherwise, hiding bugs)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                noise = torch.randn(param.shape, generator=generator, dtype=torch.float32) * std
                param.copy_(noise.to(param.dtype))


def one_torch_thread():
    """Generator for a module-scoped autouse fixture: run tiny models on one thread.

    Tiny matmuls gain nothing from intra-op threads, and on a busy 2-core machine OpenMP threads
    waiting on each other make them 10-100x slower. Restores the previous setting afterwards.

    Example:
        ```py
        >>> from tiny_models import one_thread_per_module  # noqa: F401  (in a test module)  # doctest: +SKIP
        ```
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)



@pytest.fixture(autouse=True, scope="module")
def one_thread_per_module():
    """Autouse, module-scoped `one_torch_thread`: import it into a test module to cover that module's tests."""
    yield from one_torch_thread()

def saved_lora_llama(folder) -> tuple[nn.Module, LlamaConfig]:
    """A one-layer Llama with a rank-2 LoRA on q_proj (random lora_B, seed 0), saved to `folder`.

    Returns the PEFT model and its base config, so a test can rebuild the base and compare a loaded adapter.

    Example:
        ```py
        >>> model, config = saved_lora_llama(tmp_path / "g")  # doctest: +SKIP
        ```
    """
    import peft

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    model = peft.get_peft_model(LlamaForCausalLM(config), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    model.save_pretrained(folder)
    return model, config
