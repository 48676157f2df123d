"""opdflow's evaluation: lm-eval (lm-evaluation-harness) integration and the local benchmark tasks.

``opdflow.evals.harness`` runs lm-eval on a model dir; ``evals/tasks/`` holds the task templates
(``opdflow_arith``: the demo's synthetic benchmark). Nothing is imported eagerly here.
"""
