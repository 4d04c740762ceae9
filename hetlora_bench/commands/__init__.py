"""The bench's `hetlora` subcommands (`simulate`, `report`), imported lazily by `peft_hetlora.cli.bench_command_module`."""
