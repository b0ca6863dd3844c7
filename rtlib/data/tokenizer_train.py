"""The text tokenizers of `rtlib data prepare`: read from a file (`--tokenizer PATH`: a Hugging
Face `tokenizer.json`, or a directory holding one, or a sentencepiece `.model`), or trained
with Hugging Face `tokenizers` on the training split (`--train-tokenizer bpe|unigram|word
--vocab-size N`).

Trained tokenizers put their special tokens first: `<eos>` (id 0, ending every document) and,
for `unigram` and `word`, `<unk>` (id 1).

- `bpe`: byte-level BPE (GPT-2's pre-tokenizer and byte alphabet): lossless for any text, at
  least 257 ids (256 bytes and `<eos>`).
- `unigram`: a unigram language model over SentencePiece-style pieces (`▁` marks a space);
  characters never seen in training become `<unk>`.
- `word`: one id per whitespace-separated word, and one for a line break (the Wikitext-103
  setting); words outside the vocabulary become `<unk>`. Decoding joins words by spaces.
"""

from collections.abc import Iterable
from pathlib import Path

from rtlib.data.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    TextTokenizer,
    _line,
    require,
)
from rtlib.errors import BadArgument, SourceError

TRAINABLE = ("bpe", "unigram", "word")
EOS, UNK = "<eos>", "<unk>"
# End-of-document tokens of common tokenizer.json files, tried in order when --eos is not given
KNOWN_EOS = (EOS, "</s>", "<|endoftext|>", "<|end_of_text|>", "<|im_end|>")
SMALLEST = {"bpe": 257, "unigram": 3, "word": 3}  # specials + what the model needs at least


def load_tokenizer(spec: str, *, eos: str | None = None) -> TextTokenizer:
    """The tokenizer in file `spec`; SourceError naming the file when it cannot be read or is
    not a tokenizer (or lacks an end-of-document token)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / HFTokenizer.file_name
    if path.suffix not in (".json", ".model"):
        raise SourceError(f"{path}: a tokenizer is a Hugging Face tokenizer.json (or a directory "
                          "holding one) or a sentencepiece .model, or `bytes`")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SourceError(f"{path}: cannot read the tokenizer file: {e.strerror or e}") from None
    origin = {"from": str(path.resolve())}
    try:
        if path.suffix == ".model":
            return SentencePieceTokenizer(data, eos=eos, origin=origin)
        return HFTokenizer.from_file_bytes(data, eos=eos or _find_eos(data), origin=origin)
    except ValueError as e:
        raise SourceError(f"{path}: {e}") from None


def _find_eos(data: bytes) -> str:
    tokenizers = require("tokenizers", "a Hugging Face tokenizer")
    try:
        vocab = tokenizers.Tokenizer.from_str(data.decode("utf-8")).get_vocab(
            with_added_tokens=True)
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file
        raise ValueError(f"not a Hugging Face tokenizer.json: {_line(e)}") from None
    found = next((t for t in KNOWN_EOS if t in vocab), None)
    if found is None:
        raise ValueError(f"none of the end-of-document tokens {', '.join(KNOWN_EOS)} is in its "
                         "vocabulary: name the token that ends a document with --eos")
    return found


def check_trainable(kind: str, vocab_size: int | None) -> None:
    """BadArgument for a tokenizer kind or size that cannot be trained, before reading data."""
    if kind not in TRAINABLE:
        raise BadArgument(f"--train-tokenizer {kind!r}: choose one of {', '.join(TRAINABLE)}")
    if vocab_size is None:
        raise BadArgument(f"--train-tokenizer {kind} needs --vocab-size N")
    if vocab_size < SMALLEST[kind]:
        why = {"bpe": "256 byte ids and <eos>", "unigram": "<eos>, <unk> and one piece",
               "word": "<eos>, <unk> and one word"}[kind]
        raise BadArgument(f"--vocab-size {vocab_size} is too small for a {kind} tokenizer: it "
                          f"needs at least {SMALLEST[kind]} ({why})")
    if vocab_size >= 1 << 32:
        raise BadArgument(f"--vocab-size {vocab_size}: token ids are stored as uint32, so at "
                          f"most {(1 << 32) - 1:,}")


def train_tokenizer_on(kind: str, vocab_size: int, texts: Iterable[str]) -> HFTokenizer:
    """A `kind` tokenizer of exactly `vocab_size` ids trained on `texts`; BadArgument when the
    texts cannot give that many (naming how many they give)."""
    check_trainable(kind, vocab_size)
    require("tokenizers", f"--train-tokenizer {kind}")
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    if kind == "bpe":
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
    elif kind == "unigram":
        tokenizer = Tokenizer(models.Unigram())
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        tokenizer.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=[EOS, UNK],
                                          unk_token=UNK, show_progress=False)
    else:
        tokenizer = Tokenizer(models.WordLevel(unk_token=UNK))
        # words are split at whitespace, which is dropped, except that a line break is a word
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),
            pre_tokenizers.Split("\n", behavior="isolated")])
        trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=[EOS, UNK],
                                            show_progress=False)
    try:
        tokenizer.train_from_iterator(texts, trainer)
    except Exception as e:  # the trainers raise bare Exceptions (e.g. too small a vocabulary)
        if isinstance(e, (KeyboardInterrupt, SourceError)):
            raise
        raise BadArgument(f"--train-tokenizer {kind} --vocab-size {vocab_size}: training "
                          f"failed: {_line(e)}") from None
    got = tokenizer.get_vocab_size(with_added_tokens=True)
    if got != vocab_size:
        what = {"bpe": "merges", "unigram": "pieces", "word": "distinct words"}[kind]
        raise BadArgument(f"--vocab-size {vocab_size}: the training split has only enough "
                          f"{what} for a {kind} vocabulary of {got:,} ids; ask for at most "
                          f"{got:,} (or add text)")
    return HFTokenizer(tokenizer, eos=EOS, origin={"trained": {"model": kind,
                                                               "vocab_size": vocab_size,
                                                               "on": "train split"}})
