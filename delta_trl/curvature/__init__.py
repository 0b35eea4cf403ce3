"""θ0's task-agnostic curvature: the K-FAC/EK-FAC factors and the low-rank penalty (`factors`), their estimation on
reference text (`estimation`), and the checked on-disk cache (`cache`). See docs/CURVATURE.md."""
