"""The mathematics, imported by everything above it: LoRA adapters in effective-weight space (`adapters`), the
linearized forward and its exact teacher gradient (`linearize`), every loss term (`losses`), and θ0's content hash
(`fingerprint`). Nothing here knows about trainers, files or the Hub."""
