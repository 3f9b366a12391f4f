"""The reference: the Python `tokenizers` library trains a byte-level BPE the
way a Python user would, on the same lines, and the test compares models.

    train_tokenizer.py CORPUS VOCAB_SIZE MIN_FREQUENCY SPECIAL... > tokenizer.json
"""
import sys

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

corpus, vocab_size, min_frequency, *special = sys.argv[1:]
with open(corpus, encoding="utf-8") as f:
    lines = [line.strip() for line in f if line.strip()]

tokenizer = Tokenizer(models.BPE())
tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tokenizer.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(
    vocab_size=int(vocab_size),
    min_frequency=int(min_frequency),
    special_tokens=special,
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
)
tokenizer.train_from_iterator(lines, trainer)
sys.stdout.write(tokenizer.to_str())
