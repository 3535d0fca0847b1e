"""The knowledge-distillation core shared by the trainers, the preprocessing steps, the GLUE code and the
benchmarks: user errors and atomic files (`errors`, `fsutil`), the artifacts and shard format of the pipeline
(`artifacts`, `shard_io`), tokenizer and model loading (`tokenizer_utils`, `model_io`), and the pieces of a
distillation step (`step_runner`, `hidden_projection`, `hidden_args`)."""
