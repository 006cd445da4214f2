"""Data: the synthetic knowledge benchmark (`synthetic`), a word-level tokenizer (`tokenizer`),
MDS writing in the trainer's schema (`mds`, `cli` = the `smft-data` command), converters for the
real datasets (`real`) and the resumable rank-partitioned loader (`loader`)."""
