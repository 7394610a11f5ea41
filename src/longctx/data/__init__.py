"""Text the project ships (public domain), for training the tiny tokenizer offline."""
from importlib.resources import files

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # the tiny tokenizer's, ids 0, 1, 2


def corpus() -> list[str]:
    """The shipped public-domain texts, one string per file, in name order."""
    folder = files(__package__) / "corpus"
    return [p.read_text(encoding="utf-8") for p in sorted(folder.iterdir(), key=lambda p: p.name)
            if p.name.endswith(".txt")]
