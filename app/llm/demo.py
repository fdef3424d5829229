"""Build the embedded demo model: a small Falcon-architecture model and a locally trained tokenizer.

Nothing can be downloaded on an air-gapped server (or on our CI), so the demo and the tests use
a model this module builds: Falcon-7B's architecture (multi-query attention, parallel attention
and MLP, rotary positions) at a tiny size, with a byte-level BPE tokenizer trained with the
`tokenizers` library on `demo_corpus.txt` (a few paragraphs of policy text and the sample data
set's questions and answers, so its words are whole tokens: an answer is about 33 tokens, not 60).
It is saved as an ordinary Hugging Face model directory and served through the same loader as a
real checkpoint.

Its weights are random, so it writes word salad from the corpus' vocabulary. The output head is
scaled so that sampling is decisive, and end-of-text is held well below the other tokens, so
replies run until the token limit (a random model that stopped at random would make a poor demo
and flaky tests) until an adapter teaches it where answers end.

    python -m app build-demo-model [DIR]
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

EOS_TOKEN = "<|endoftext|>"
DEMO_MARKER = "private_gpt_demo.json"


@dataclass(frozen=True)
class DemoModelShape:
    vocab_size: int = 4096
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    context_window: int = 8192
    seed: int = 0
    # "never": end-of-text is held 12 logits below the rest (replies run to the token limit unless an
    # adapter learned to end answers);
    # "always": it dominates (replies end at once), for tests of the end-of-text path.
    eos: str = "never"


def is_demo_model(path: str | Path) -> bool:
    return (Path(path) / DEMO_MARKER).is_file()


def ensure_demo_model(path: Path, shape: DemoModelShape | None = None) -> Path:
    """Build the demo model into `path` unless a complete one is already there."""
    if not is_demo_model(path):
        build_demo_model(path, shape or DemoModelShape())
    return path


def build_demo_model(path: Path, shape: DemoModelShape) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import FalconConfig, FalconForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=shape.vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(tokenizer_text(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, pad_token=EOS_TOKEN
    )
    tokenizer.model_max_length = shape.context_window
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    assert isinstance(eos_id, int)

    config = FalconConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        multi_query=True,
        parallel_attn=True,
        new_decoder_architecture=False,
        bias=False,
        alibi=False,
        max_position_embeddings=shape.context_window,
        tie_word_embeddings=False,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    torch.manual_seed(shape.seed)
    model = FalconForCausalLM(config)
    with torch.no_grad():
        head = model.lm_head.weight
        # Logits with a spread of a few units make sampling pick among a handful of tokens.
        head.mul_(3.0 / (head.std() * shape.hidden_size**0.5))
        # Two hidden dimensions carry constants (the final norm's bias), read only by the rows we
        # steer. Dimension 0 keeps tokens that are not clean text (lone bytes of a multi-byte
        # character, control characters) out of reach. Dimension 1 sets end-of-text: "never" puts
        # it 12 below the other logits, which sampling all but never reaches (about 1e-8 a token)
        # but a LoRA adapter can learn to overcome, so trained demo adapters do stop.
        clean = torch.zeros(len(tokenizer))
        for token_id in range(len(tokenizer)):
            text = str(tokenizer.decode([token_id]))
            if token_id != eos_id and not _clean(text):
                clean[token_id] = -10.0
        end = torch.zeros(len(tokenizer))
        end[eos_id] = {"never": -1.2, "always": 10.0}[shape.eos]
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[:2] = 10.0
        head[:, 0] = clean
        head[:, 1] = end

    tmp = path.with_name(path.name + ".building")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / DEMO_MARKER).write_text(json.dumps({"shape": shape.__dict__}, indent=1))
    # Rename last, so a half-written directory is never mistaken for a model.
    if path.exists():
        import shutil

        shutil.rmtree(path)
    tmp.rename(path)
    return path


def tokenizer_text() -> list[str]:
    """What the tokenizer learns its vocabulary from: the corpus, and the prompt layout.

    The layout (Alpaca preamble, default system prompt, section headers) starts every prompt, so it
    is weighted to become a few whole-word tokens: short prompts make training and replies faster.
    """
    from app.llm.prompts import DEFAULT_SYSTEM_PROMPT, alpaca_header, format_alpaca_example

    corpus = Path(__file__).with_name("demo_corpus.txt").read_text(encoding="utf-8").splitlines()
    layout = alpaca_header(DEFAULT_SYSTEM_PROMPT) + format_alpaca_example("?", "?")
    return corpus + [layout] * 20


def _clean(text: str) -> bool:
    return bool(text) and "\ufffd" not in text and all(c.isprintable() or c in " \n" for c in text)
