"""Named real setups (YAML): a model on a GPU with vLLM's engine arguments, the step-time backend and serving costs, each with its source."""
