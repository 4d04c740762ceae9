"""The `hetlora` command line: one module per subcommand, imported lazily by `peft_hetlora.cli`."""
