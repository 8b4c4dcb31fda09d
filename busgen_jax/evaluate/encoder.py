"""Domain encoders for quality and privacy metrics: features of breast-ultrasound images without downloads.

The encoder is a classifier trained here by `busgen-jax classify` on the real corpus; its penultimate layer
(global-pooled ResNet features or the ViT class token) is the feature space. Every report carries the
encoder's `name` (architecture, checkpoint, step, image size), since distances in different feature spaces
do not compare.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import jax
import ml_collections
import numpy as np

from busgen_jax import console, parallel
from busgen_jax.data import pipeline
from busgen_jax.train import classifier


class ClassifierEncoder:
  """The penultimate layer of a saved classifier (`classify`'s `DIR/best`) as an image encoder."""

  def __init__(self, directory: str | Path, *, batch_size: int = 0):
    weights, meta = classifier.load_classifier(directory)
    cfg = ml_collections.ConfigDict(json.loads(meta["config"]))
    self.setup = setup = classifier.Setup(cfg, meta["vocab"])
    self.image_size = cfg.data.image_size
    self.batch_size = batch_size or cfg.eval_batch_size
    self.device_vocab = tuple(cfg.data.device_vocab)
    self.field, self.classes = cfg.task.field, list(cfg.task.classes)   # what the classifier predicts
    step = (meta.get("best") or {}).get("step", "?")
    self.name = f"classifier:{cfg.model.name}:{Path(directory)}@step{step}:{self.image_size}px"
    self.params = jax.device_put(weights["params"], setup.repl)
    self.stats = jax.device_put(weights["batch_stats"], setup.repl)
    rows = parallel.batch_sharding(setup.mesh, setup.rules, 2)

    def features_and_probs(p, s, x):
      model = setup.model(p, s)
      return model.features(x), jax.nn.softmax(model(x), -1)

    self._features = jax.jit(features_and_probs,
                             in_shardings=(setup.repl, setup.repl, parallel.batch_sharding(setup.mesh, setup.rules, 4)),
                             out_shardings=(rows, rows))

  def _batch(self, local_images: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """(features, probs) of one batch: this process's rows in, the global batch's sharded arrays out."""
    batch = parallel.global_batch({"image": local_images}, self.setup.mesh, self.setup.rules)
    return self._features(self.params, self.stats, batch["image"])

  def encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(features (n, d), probs (n, len(classes))) of images in memory, (n, size, size, 3) in [-1, 1] as the
    pipeline gives them: a probe's or a notebook's samples before any dataset is written. One process."""
    images = np.asarray(images, np.float32)
    size = self.image_size
    if images.ndim != 4 or images.shape[1:] != (size, size, 3) or not len(images):
      raise ValueError(f"{self.name}: expected n >= 1 images of shape (n, {size}, {size}, 3), got {images.shape}")
    if jax.process_count() != 1:
      raise RuntimeError("ClassifierEncoder.encode runs on one process; a multi-host job reads a dataset "
                         "(calling the encoder on a path)")
    feats, probs = [], []
    with jax.set_mesh(self.setup.mesh):
      for start in range(0, len(images), self.batch_size):
        chunk = images[start:start + self.batch_size]
        pad = np.zeros((self.batch_size - len(chunk), size, size, 3), np.float32)   # a whole last batch
        f, p = self._batch(np.concatenate([chunk, pad]))
        feats.append(np.asarray(f)[:len(chunk)])
        probs.append(np.asarray(p)[:len(chunk)])
    return np.concatenate(feats), np.concatenate(probs)

  def __call__(self, path: str | Path, split: str, *, filters: Mapping | None = None, indices=()) -> dict:
    """Features of every selected example of a split, in record order, with its labels as names and the
    classifier's own predictions: {"features": (n, d) float32, "probs": (n, len(classes)), "classes", "index",
    "pathology", "device", <the task field>, "encoder"}."""
    pipe = pipeline.build_eval(str(path), split, image_size=self.image_size, batch_size=self.batch_size,
                               filters=filters, indices=indices)
    fields = list(dict.fromkeys(("pathology", "device", self.field)))
    feats, probs, index, labels = [], [], [], {f: [] for f in fields}
    it = iter(pipe)
    bar = console.bar(len(pipe.batches), f"features of {split}", unit="batch")
    try:
      with jax.set_mesh(self.setup.mesh):
        for local in it:
          f, p = self._batch(local["image"])
          rows = parallel.gather_rows({"f": f, "p": p, "valid": local["valid"], "index": local["index"],
                                         **{k: local[k] for k in fields}})
          keep = rows["valid"]
          feats.append(np.asarray(rows["f"][keep], np.float32))
          probs.append(np.asarray(rows["p"][keep], np.float32))
          index.append(rows["index"][keep])
          for k in fields:
            labels[k].append(rows[k][keep])
          bar.update()
    finally:
      it.close()
      bar.close()
    names = lambda field, ids: [pipe.vocab[field][i] for i in np.concatenate(ids)]
    return {"features": np.concatenate(feats), "probs": np.concatenate(probs), "classes": self.classes,
            "index": np.concatenate(index), **{k: names(k, v) for k, v in labels.items()}, "encoder": self.name}
