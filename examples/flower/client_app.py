"""The HetLoRA ClientApp: trains a local round at the rank the server assigns this node."""

from hetlora_task import task_fn

from peft_hetlora.flower import make_client_app

app = make_client_app(task_fn)
