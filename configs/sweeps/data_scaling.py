"""The data-scaling curve: test AUC of a classifier vs the number of generated images it sees, with real data
mixed in at two shares (the paper's Fig. 3 experiment), on the demo's phantom data.

  busgen-jax demo --workdir /tmp/busgen_demo      # the real and generated datasets it uses
  busgen-jax sweep --config configs/sweeps/data_scaling.py:/tmp/busgen_demo --workdir /tmp/sweep_scaling
  # on a TPU VM (launch/tpu.sh): --mode=tpu --config.tpu.zone=ZONE --config.tpu.name=NAME --workdir gs://B/sweeps/x

Each run is `busgen-jax classify --config configs/classify.py:real=...,generated=...` with
`data.sources.generated.limit` generated images and the generated share of the training stream given by
`gen_share`; results go to DIR/sweep.md and DIR/sweep.png (AUC with its 95% CI vs generated images).
"""

import ml_collections

from busgen_jax.stages import sweep


def get_config(arg: str = "/tmp/busgen_demo"):
  demo = arg or "/tmp/busgen_demo"
  real, generated = f"{demo}/data", f"{demo}/generated/data"
  c = sweep.default_config()
  c.stage = "classify"
  c.config = f"configs/classify.py:real={real},generated={generated},size=32,steps=400"
  c.axes = ml_collections.ConfigDict({
      "n_gen": {"key": "data.sources.generated.limit", "values": (125, 250, 500, 1000)},
      "gen_share": {"key": "data.sources.generated.weight", "values": (0.5, 0.8)},
      "real_share": {"key": "data.sources.real.weight", "values": (0.5, 0.2)},
  })
  c.zip = ("gen_share", "real_share")
  c.metrics = "eval/real_test.json"
  c.plot = {"x": "n_gen", "y": "auc", "group": "gen_share", "xscale": "log"}
  return c
