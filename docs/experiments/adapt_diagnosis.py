"""Does an adapted model carry its classes apart? The diagnosis behind docs/EXPERIMENTS.md's few-shot section.

  python docs/experiments/adapt_diagnosis.py --adapt DIR/adapt [--generated DIR/generated_adapted] [--json OUT]
  # the demo (its new site):  --adapt /tmp/demo/fewshot/k16_d0/adapt --generated /tmp/demo/fewshot/k16_d0/generated_adapted
  # a few-shot draw of the experiment:  --adapt /tmp/fs/fewshot/k32_d0/adapt --generated /tmp/fs/fewshot/k32_d0/generated_adapted
  # grey levels alone, of any datasets (a dataset or a `sample` workdir, optionally :split; default train):
  python docs/experiments/adapt_diagnosis.py --grey /tmp/exp_cpu/generated /tmp/exp_cpu/data:val [--size 64]
  # a pretrained model as a classifier on a dataset's images (its pathology rows; default split val):
  python docs/experiments/adapt_diagnosis.py --conditioning /tmp/busgen_demo/diffusion/checkpoints \
      /tmp/busgen_demo/data

Two measurements on the adaptation's own validation images (other cases than the shots):
  1. The model as a classifier: each image's denoising loss under each class's label row (fixed timesteps and
     noise); the class with the lowest loss is the model's guess. Chance accuracy means the label rows do not
     tell the classes apart, whatever the sampler does; the base model is scored too when it has the rows.
  2. Lesion appearance: the mean grey level inside the lesion boxes, per class, of the real validation images and
     of the generated repository. A class difference the real images have and the generated ones lack (or
     reverse) is what a classifier trained on the generated images cannot learn.
"""

import argparse
import json
from pathlib import Path

import numpy as np

from busgen_jax import xla_env  # noqa: E402

xla_env.script()   # as the CLI does, before jax is first imported

from busgen_jax import checkpoint  # noqa: E402
from busgen_jax.models import card  # noqa: E402
from busgen_jax.evaluate import membership  # noqa: E402
from busgen_jax.train import adapt  # noqa: E402

TIMESTEPS = (0.05, 0.15, 0.3, 0.5, 0.7)   # fractions of the schedule's T: where class information shows


def scores(model, path: str, split: str, idx: np.ndarray, rows: dict[str, int], repeats: int) -> np.ndarray:
  """(images, classes) denoising losses, each image under each class's row."""
  ts = [int(f * model.cfg.T) for f in TIMESTEPS]
  return np.stack([membership.denoising_losses(model, path, split, idx, timesteps=ts, repeats=repeats,
                                            batch_size=32, rows={"pathology": r}) for r in rows.values()], 1)


def as_classifier(loss: np.ndarray, truth: np.ndarray) -> dict:
  guess = loss.argmin(1)
  margin = loss[np.arange(len(truth)), 1 - truth] - loss[np.arange(len(truth)), truth] if loss.shape[1] == 2 else None
  return {"accuracy": float((guess == truth).mean()), "n": int(len(truth)),
          "mean_loss_by_true_class": {int(c): loss[truth == c].mean(0).round(5).tolist() for c in np.unique(truth)},
          "mean_margin": None if margin is None else float(margin.mean())}


def lesion_grey(path: str, split: str, field: str, classes: list[str], size: int, indices=()) -> dict:
  """Per class: mean grey level (0-255) inside the lesion boxes and outside them, of the images as the model sees
  them (the evaluation pipeline's centre crop at `size`), so real and generated images compare."""
  from busgen_jax.data import pipeline
  pipe = pipeline.build_eval(path, split, image_size=size, batch_size=32, filters={field: classes},
                             indices=tuple(indices), process_index=0, process_count=1)
  names = pipe.vocab[field]
  out = {c: {"inside": [], "outside": []} for c in classes}
  it = iter(pipe)
  try:
    for b in it:
      grey, box = (np.asarray(b["image"])[..., 0] + 1) * 127.5, np.asarray(b["box"])[..., 0] > 0.5
      for j in np.flatnonzero(b["valid"]):
        if box[j].any() and (~box[j]).any():
          out[names[int(b[field][j])]]["inside"].append(grey[j][box[j]].mean())
          out[names[int(b[field][j])]]["outside"].append(grey[j][~box[j]].mean())
  finally:
    it.close()
  return {c: {k: float(np.mean(v)) if v else None for k, v in d.items()} | {"n": len(d["inside"])}
          for c, d in out.items()}


def conditioning(checkpoints: str, path: str, split: str, repeats: int) -> dict:
  """A trained model's benign and malignant rows as a classifier on a dataset split's images of those classes."""
  from busgen_jax.data import pipeline, reader
  ds = reader.open_dataset(path)
  names = ds.vocab("pathology")
  label = np.asarray([names[i] for i in pipeline.scan_labels(ds, split)["pathology"]])
  idx = np.flatnonzero(np.isin(label, ["benign", "malignant"]))
  model = card.load(checkpoints)
  rows = {c: model.card.vocab["pathology"].index(c) for c in ("benign", "malignant")}
  return {"checkpoints": checkpoints, "dataset": path, "split": split, "rows": rows,
          **as_classifier(scores(model, path, split, idx, rows, repeats), (label[idx] == "malignant").astype(int))}


def _dataset(path: str) -> Path:
  found = sorted(Path(path).rglob("dataset_info.json"))   # a `sample` workdir holds data/<name>/<version>
  if len(found) != 1:
    raise SystemExit(f"{path}: expected one dataset below it, found {len(found)}")
  return found[0].parent


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--adapt", help="a `busgen-jax adapt` workdir (or a demo's / few-shot draw's adapt/)")
  p.add_argument("--grey", nargs="*", default=(), help="DIR[:split] ...: grey levels of these datasets only")
  p.add_argument("--size", type=int, default=64, help="--grey: the model view's size")
  p.add_argument("--conditioning", nargs=2, metavar=("CHECKPOINTS", "DATASET[:split]"),
                 help="score a trained model's benign / malignant rows as a classifier on a dataset's images")
  p.add_argument("--generated", default="", help="the repository generated from it")
  p.add_argument("--repeats", type=int, default=4)
  p.add_argument("--json", default="")
  a = p.parse_args()
  if a.grey:
    for spec in a.grey:
      path, _, split = spec.partition(":")
      g = lesion_grey(str(_dataset(path)), split or "train", "pathology", ["benign", "malignant"], a.size)
      print(f"{spec}: " + ", ".join(f"{c} inside {v['inside']:.1f} outside {v['outside']:.1f} (n {v['n']})"
                                    for c, v in g.items()))
    return
  if a.conditioning:
    ckpt, spec = a.conditioning
    path, _, split = spec.partition(":")
    print(json.dumps(conditioning(ckpt, str(_dataset(path)), split or "val", a.repeats), indent=1))
    return
  if not a.adapt:
    p.error("--adapt, --conditioning or --grey is required")
  work = Path(a.adapt)
  _, meta = checkpoint.load_meta(work / adapt.ADAPTERS)
  task, data = card.Card.from_meta(meta).task, meta["data"]
  classes = list(task["classes"])
  val = {c: np.asarray(data["val"][c], np.int64) for c in classes}
  idx = np.sort(np.concatenate(list(val.values())))
  truth = np.array([next(j for j, c in enumerate(classes) if i in set(val[c].tolist())) for i in idx])
  model = card.load(adapters=str(work / adapt.ADAPTERS))
  rows = {c: int(task["rows"][c]) for c in classes}
  out = {"adapt": str(work), "classes": classes, "rows": rows,
         "adapted_as_classifier": as_classifier(scores(model, data["path"], data["val_split"], idx, rows, a.repeats),
                                                truth)}
  b = card.Card.from_meta(meta).adapters["base"]
  base = card.load(b["checkpoint"], which=b["which"], step=b["step"], device_names=b["device_names"],
                   image_size=model.image_size)
  if max(rows.values()) < base.cfg.num_pathology:     # the base has these rows (task.rows=existing)
    out["base_as_classifier"] = as_classifier(scores(base, data["path"], data["val_split"], idx, rows, a.repeats),
                                              truth)
  out["real_val_grey"] = lesion_grey(data["path"], data["val_split"], task["field"], classes, model.image_size, idx)
  if a.generated:
    out["generated_grey"] = lesion_grey(str(_dataset(a.generated)), "train", task["field"], classes, model.image_size)
  text = json.dumps(out, indent=1)
  print(text)
  if a.json:
    Path(a.json).write_text(text)


if __name__ == "__main__":
  main()
