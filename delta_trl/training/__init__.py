"""The DELTA fields and configs (`configs`), the mixin both trainers share (`trainer_base`), and the trainers:
`DeltaTrainer` (Seq2SeqTrainer) and `DeltaDPOTrainer` (TRL's DPOTrainer)."""
