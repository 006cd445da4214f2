"""smft_dist: Sparse Memory Finetuning (Lin et al., arXiv 2510.15103) at cluster scale."""
__version__ = "0.1.0"
