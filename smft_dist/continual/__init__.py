"""Applications built on the library: the continual-learning benchmark (`benchmark`: pretrain,
df index, one step per fact with full finetuning / LoRA / sparse memory finetuning, sweeps,
ablations) and its report (`report`: matched-learning tables, paper checks, plots)."""
