"""Membership inference against a diffusion model: the denoising-loss attack (Carlini et al. 2023, Matsumoto
et al. 2023). The model's loss at fixed timesteps and noise is lower on images it was trained on; the attack's
AUC (members against non-members) comes with a case-level bootstrap CI. 0.5: the loss does not tell them apart.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from busgen_jax import console
from busgen_jax.evaluate import metrics


def membership_auc(member_losses: np.ndarray, nonmember_losses: np.ndarray, *, member_cases=None,
                   nonmember_cases=None, n_bootstrap: int = 1000, seed: int = 0) -> dict:
  """The denoising-loss attack's AUC (lower loss = "member"), with a case-level bootstrap CI."""
  y = np.r_[np.ones(len(member_losses)), np.zeros(len(nonmember_losses))]
  cases = None
  if member_cases is not None and nonmember_cases is not None:
    cases = np.r_[[f"m:{c}" for c in member_cases], [f"n:{c}" for c in nonmember_cases]]
  auc, lo, hi = metrics.bootstrap_ci(y, -np.r_[member_losses, nonmember_losses], cases=cases, n=n_bootstrap,
                                     seed=seed)
  return {"auc": auc, "auc_ci95": [lo, hi], "n_members": int(len(member_losses)),
          "n_nonmembers": int(len(nonmember_losses)), "mean_loss_members": float(np.mean(member_losses)),
          "mean_loss_nonmembers": float(np.mean(nonmember_losses))}


# ------------------------------------------------------------------------------------------------ the attack

def denoising_losses(model, path: str | Path, split: str, indices: Sequence[int], *, timesteps: Sequence[int],
                     repeats: int, batch_size: int, seed: int = 0, rows: Mapping[str, int] | None = None
                     ) -> np.ndarray:
  """Per-image eps-prediction MSE of a diffusion model (models.card.Model) averaged over fixed timesteps and noise
  draws (noise seeded by record index, so a re-run gives the same losses). Conditions: the image's own labels
  and lesion box, mapped to the model's vocabularies by name (unknown names -> the null row); `rows` fixes the
  model row of some fields for every image instead (e.g. {"pathology": r}: scoring each image under each class
  makes the model a classifier, which says whether its label rows carry the classes apart)."""
  from flax import nnx
  from busgen_jax import parallel
  from busgen_jax.data import pipeline
  from busgen_jax.diffusion import objectives, schedule
  from busgen_jax.models import unet
  tc = model.train_config
  sched = schedule.Schedule.from_config(ml_collections.ConfigDict(tc.get("schedule") or
                                                                  schedule.default_config().to_dict()))
  prediction = (tc.get("objective") or {}).get("prediction", "eps")
  bad = [t for t in timesteps if not 0 <= t < sched.T]
  if bad:
    raise ValueError(f"mia.timesteps {bad} outside [0, {sched.T})")
  mesh = parallel.make_mesh({"data": -1}, jax.local_devices())
  batch_size = -(-batch_size // mesh.size) * mesh.size
  fixed = dict(rows or {})
  rows = parallel.rows(mesh)
  repl = parallel.replicated(mesh)
  graphdef = nnx.graphdef(unet.abstract(model.cfg))
  conds = tuple(model.cfg.conditions)
  draws = jnp.asarray([(t, r) for t in timesteps for r in range(repeats)], jnp.int32)
  key0 = jax.random.PRNGKey(seed)

  @functools.partial(jax.jit, in_shardings=(repl, rows, rows, rows), out_shardings=rows)
  def losses(params, x0, index, cond):
    net = nnx.merge(graphdef, params)

    def one(tr):
      t = jnp.full((x0.shape[0],), tr[0], jnp.int32)
      noise = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(jax.random.fold_in(key0, i), tr[1]),
                                                   x0.shape[1:]))(index)
      a = jnp.asarray(sched.sqrt_ab, jnp.float32)[t][:, None, None, None]
      s = jnp.asarray(sched.sqrt_1m_ab, jnp.float32)[t][:, None, None, None]
      xt = a * x0 + s * noise
      eps = objectives.eps_from_prediction(net(xt, t, cond), xt, t, sched, prediction)
      return jnp.mean(jnp.square(eps.astype(jnp.float32) - noise), axis=(1, 2, 3))

    return jnp.mean(jax.lax.map(one, draws), axis=0)

  params = jax.device_put(jax.tree.map(jnp.asarray, model.params), repl)
  pipe = pipeline.build_eval(str(path), split, image_size=model.image_size, batch_size=batch_size,
                             indices=np.asarray(indices), process_index=0, process_count=1)
  lut = {f: np.array([model.vocab[f].index(n) if n in model.vocab[f] else 0 for n in pipe.vocab[f]], np.int32)
         for f in ("pathology", "device")}
  out, idx = [], []
  it = iter(pipe)
  bar = console.bar(len(indices), f"membership losses, {split}", unit="image")
  try:
    for b in it:
      cond = {k: np.full(len(b[k]), fixed[k], np.int32) if k in fixed else lut[k][b[k]] if k in lut else b[k]
              for k in conds}
      put = lambda a: jax.device_put(np.asarray(a), rows)
      loss = losses(params, put(b["image"]), put(b["index"]), jax.tree.map(put, cond))
      keep = np.asarray(b["valid"])
      out.append(np.asarray(loss)[keep])
      idx.append(np.asarray(b["index"])[keep])
      bar.update(int(keep.sum()))
  finally:
    it.close()
    bar.close()
  order = np.argsort(np.concatenate(idx), kind="stable")   # back to the order of `indices` (sorted record order)
  return np.concatenate(out)[order]
