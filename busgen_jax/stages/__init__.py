"""One module per `busgen-jax` stage, named after it (`fit-box-prior` is fit_box_prior.py).

Each has `main(cfg, workdir, argv)` and `default_config()` (the config of a run without `--config`), and may set
`define_flags()` (the stage's own flags), `REQUIRES_CONFIG` (a config file must be given), `NO_CONFIG` (the stage
takes none), `WORKDIR_OPTIONAL` and `OPEN_KEYS` (config dicts that take new keys, `--config.external.NAME=PATH`).
`busgen_jax/cli.py` is the table of stage -> module; the stages call down into the library (data, models, train,
generate, evaluate), and only they and the CLI sit above it.
"""
