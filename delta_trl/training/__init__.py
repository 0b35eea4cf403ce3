"""The DELTA fields and configs (`configs`), the mixin the trainers share (`trainer_base`), and the trainers:
`DeltaTrainer` (Seq2SeqTrainer), `DeltaSFTTrainer` (TRL's SFTTrainer) and `DeltaDPOTrainer` (TRL's DPOTrainer)."""
