"""Exact task arithmetic on LoRA adapters: reading and validating adapters (`adapter_io`), concatenated or folded
merges (`merge`), TIES/DARE baselines (`methods`), and the `TaskVector` algebra (`task_vector`). See docs/MERGING.md."""
