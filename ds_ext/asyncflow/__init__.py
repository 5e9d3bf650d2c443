"""AsyncFlow (arXiv 2507.01663): streaming transfer queue (``queue``), rollout workers (``rollout``), GRPO trainer
(``trainer``, ``grpo``), process wiring (``runtime``) and the example task (``task``)."""
