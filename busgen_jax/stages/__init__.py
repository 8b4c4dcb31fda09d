"""One module per `busgen-jax` stage, named after it (`fit-box-prior` is fit_box_prior.py).

Each has `default_config()` (the config a run without `--config` uses; None where a config file is required),
optionally `define_flags()` for the stage's own flags, and `main(cfg, workdir, argv)`. `busgen_jax/cli.py` is the
table of stage -> module; the stages call down into the library (data, models, train, generate, evaluate).
"""
