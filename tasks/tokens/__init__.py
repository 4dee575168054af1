"""The tokenize stage's helpers: the BPE and its sample (bpe), one shard's encoding and packing
(shard), and the human-facing views of the result (views). tasks/tokenization.py is the door."""
