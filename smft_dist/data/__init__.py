"""Data: input readers for JSONL/.gz/.zst/Parquet/`datasets` (`sources`), the real QA layouts and
fact statements (`real`), document chunks and augmentations (`documents`), MDS writing in the
trainer's schema (`mds`; `cli` = the `smft-data` command), the synthetic knowledge benchmark
(`synthetic`), a word-level tokenizer (`tokenizer`) and the resumable, rank-partitioned,
fingerprinted loader (`loader`)."""
