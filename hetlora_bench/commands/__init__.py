"""The bench's `hetlora` subcommands (`simulate`, `report`), imported lazily by the `hetlora` CLI."""
