"""Knowledge patches: every sparse-memory update recorded (`ledger`), exported as a shippable,
self-describing file (`patch`), applied to or reverted from a model folder, a checkpoint or a
loaded model (`apply`), and audited (`audit`); `smft-patch` (`cli`) is the command line.

Kept import-light: the training step imports `smft_dist.patch.ledger`.
"""
