"""QLoRA fine-tuning of adapters on question/answer data, published into the server's registry.

    python -m training training/configs/tiny-cpu.yaml [--key value ...]   train (see __main__.py)
    python -m training validate CONFIG.yaml                                check config and data
    python -m training publish runs/x/adapter --name NAME                  register an adapter

config.py (settings), data.py (records -> prompt/completion examples), trainer.py (TRL SFTTrainer
on the 4-bit base), publish.py (through the registry's own checks). Imports app.llm and
app.registry, never the web server.
"""
