"""The knowledge-distillation core shared by the trainers, the preprocessing steps, the GLUE code and the
benchmarks.

Data flow of a run: `run_pipeline.py` writes OUT/ and its `manifest.json` -> `config.TrainConfig` (typed, built
once from the command line; `--pipeline_dir` fills the artifact flags from the manifest) -> `alignments` (the
KL alignment and the hidden-state positions, chosen by name from a registry, loading only the artifacts they
read) + the loss terms (`step_runner`, `hidden_projection` over `custom_step.py`) -> `trainer_core` (precision,
AdamW and its step, the learning-rate schedule, hidden-loss and curvature builders; also used by the GLUE
trainer) inside `distiller.Distiller` -> an HF student directory.

Also here: user errors and atomic files (`errors`, `fsutil`), the artifacts and shard format of the pipeline
(`artifacts`, `shard_io`), tokenizer and model loading (`tokenizer_utils`, `model_io`) and the hidden-loss flags
shared by both CLIs (`hidden_args`)."""
