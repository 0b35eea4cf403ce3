"""Scoring models at θ0 + Σ α_t·τ_t (`scoring`), α selection (`selection`), diagnostics and their plots
(`diagnostics`, `plots`), and the shipped `evaluate` metric (`metrics`)."""
