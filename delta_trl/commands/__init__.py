"""Sub-commands of the ``delta-trl`` command line."""
