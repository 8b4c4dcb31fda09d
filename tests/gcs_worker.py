"""The bucket test's worker (tests/test_gcs.py), in a process of its own so that the emulator's environment
(STORAGE_EMULATOR_HOST, TENSORSTORE_GCS_HTTP_URL, EPATH_USE_TF=false: read once per process) reaches nothing else.

  python tests/gcs_worker.py BUCKET LOCAL_DIR OUT_JSON
  python tests/gcs_worker.py --train BUCKET LOCAL_DIR NUM_STEPS      # the fault test: train alone, a save every 2

Every run directory is gs://BUCKET/runs/<stage>; only the datasets (ArrayRecord: local files) are under LOCAL_DIR.
train -> fit-box-prior -> sample -> classify -> quality -> audit (with membership inference on the bucket's
checkpoint) -> sweep (its runs as `busgen-jax` subprocesses) -> sweep collect. Writes what it returned to OUT_JSON.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from busgen_jax import xla_env  # noqa: E402

xla_env.script()   # the production XLA:CPU settings, absl flags parsed


def main(bucket: str, local: str, out: str) -> None:
  import ml_collections
  from busgen_jax import generate
  from busgen_jax.data import box_prior, convert
  from busgen_jax.evaluate import fidelity, privacy
  from busgen_jax.stages import classify, sweep
  from busgen_jax.train import classifier, diffusion
  from helpers import convert_config, tiny_diffusion_config

  runs = f"gs://{bucket}/runs"
  data = convert.convert(convert_config("phantom", "", f"{local}/data", **{
      "phantom.num_examples": 96, "phantom.size": 32,
      "split.fractions": {"train": 0.6, "val": 0.2, "test": 0.2}}))
  result = {"data": str(data)}

  # train: checkpoints, model card and TensorBoard events in the bucket.
  result["train"] = diffusion.train(tiny_diffusion_config(data, 4, conditions=("pathology", "device", "box")),
                                    f"{runs}/train")

  # fit-box-prior: written to and read back from the bucket.
  b = box_prior.default_config()
  b.dataset = str(data)
  result["box_prior"] = str(box_prior.run(b, f"{runs}/box_prior"))

  # sample: the model from the bucket; the dataset local (ArrayRecord), its folder given.
  g = generate.default_config()
  g.update(checkpoint=f"{runs}/train/checkpoints", box_prior=result["box_prior"], pathology=("benign", "malignant"),
           device=("all",), num_per_condition=4, per_device_batch=1, examples_per_shard=8,
           output=f"{local}/generated")
  g.sampler.update(method="multistep", order=2, steps=2)
  gen = generate.generate(g, f"{runs}/sample")
  result["generated"] = str(gen)

  # classify: trained on the generated images, selected on real validation, tested on real test.
  c = classifier.default_config()
  c.data.sources.real.path = str(gen)   # the one training source (its name is only a label)
  c.val = {"path": str(data), "split": "val"}
  c.data.image_size, c.data.batch_size, c.data.ultrasound_augment = 32, 8, ()
  c.model.name = "resnet_tiny"
  c.num_steps, c.log_every, c.eval_every, c.checkpoint_every = 6, 3, 3, 6
  c.n_bootstrap = 20
  c.test = {"real_test": {"path": str(data), "split": "test"}}
  result["classify"] = {k: {"auc": v["auc"], "n": v["n"]} for k, v in classify.run(c, f"{runs}/classify").items()}

  # quality and audit: their encoder (and the audit's membership-inference model) read from the bucket.
  q = fidelity.default_config()
  q.update(real=str(data), real_split="test", generated=str(gen), generated_split="train",
           encoder=f"{runs}/classify/best", conditions=(), min_count=4, bootstrap=10, kid_subsets=4,
           kid_subset_size=8)
  result["quality"] = fidelity.run(q, f"{runs}/quality")["fidelity"]["all"]["num_generated"]
  a = privacy.default_config()
  a.update(generated=str(gen), train=str(data), holdout_split="test", encoder=f"{runs}/classify/best")
  a.mia.update(checkpoint=f"{runs}/train/checkpoints", max_per_group=8, repeats=1, batch_size=8, bootstrap=10)
  result["audit"] = privacy.run(a, f"{runs}/audit")["n_generated"]

  # sweep: two fit-box-prior runs as CLI subprocesses (their console logs go to the bucket too), then collect.
  s = sweep.default_config()
  s.update(stage="fit-box-prior", metrics="box_prior.json", fixed=(f"dataset={data}",))
  s.axes = ml_collections.ConfigDict({"bandwidth": {"key": "bandwidth", "values": (0.001, 0.002)}})
  table = sweep.run(s, f"{runs}/sweep", mode="local", log=lambda *_: None)
  result["sweep"] = [{k: r.get(k) for k in ("run", "status", "bandwidth")} for r in table["rows"]]

  with open(out, "w") as f:
    json.dump(result, f, default=str)


def train(bucket: str, local: str, num_steps: str) -> None:
  """The tiny diffusion model trained to NUM_STEPS with a checkpoint every 2 steps in gs://BUCKET/fault/train,
  resuming from its latest checkpoint; the phantom dataset is converted into LOCAL_DIR (once: a rerun's conversion
  resumes). Prints the step it resumes from and the last logged scalars as JSON."""
  from busgen_jax import checkpoint
  from busgen_jax.data import convert
  from busgen_jax.train import diffusion
  from helpers import convert_config, tiny_diffusion_config
  # A conversion whose shards exist resumes with nothing to do and returns the same dataset directory.
  data = convert.convert(convert_config("phantom", "", os.path.join(local, "data"),
                                        **{"phantom.num_examples": 32, "phantom.size": 32}))
  cfg = tiny_diffusion_config(data, int(num_steps))
  cfg.checkpoint_every, cfg.log_every = 2, 2
  resumes = checkpoint.Checkpointer(f"gs://{bucket}/fault/train/checkpoints").latest_step()
  last = diffusion.train(cfg, f"gs://{bucket}/fault/train")
  print(json.dumps({"resumes_from": resumes, "last": last}, default=str))


if __name__ == "__main__":
  if sys.argv[1] == "--train":
    train(*sys.argv[2:5])
  else:
    main(*sys.argv[1:4])
