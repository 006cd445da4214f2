"""Evaluation: closed-book QA F1/EM with lockstep greedy generation (`qa`), held-out NLL (`nll`),
lm-evaluation-harness tasks (`lm_eval_adapter`), and `smft-eval` on a checkpoint or an exported
folder (`cli`: `load_eval_model`, `evaluate_model`)."""
