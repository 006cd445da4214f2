"""Evaluation: closed-book QA F1/EM with lockstep greedy generation (`qa`), held-out NLL (`nll`),
and running lm-evaluation-harness on an exported model (`lm_eval_adapter`)."""
