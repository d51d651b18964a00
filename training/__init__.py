"""Building the embedded default model family: corpus, tokenizer, training, evaluation."""
