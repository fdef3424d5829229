"""QLoRA fine-tuning of adapters that the server publishes and serves (planned: issue 4).

Nothing here yet: the chat core (issue 2) comes first. The prompt layout that training must use
is already fixed in `app.llm.prompts.format_alpaca_example`, so trained adapters see the same text
the server sends them.
"""
