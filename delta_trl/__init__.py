"""delta_trl."""
