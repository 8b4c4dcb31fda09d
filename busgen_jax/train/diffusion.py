"""Diffusion training: `busgen-jax train --config configs/<...>.py --workdir DIR`. Read top to bottom:

  mesh + rules -> Grain pipeline -> abstract model -> shardings -> restore the latest checkpoint (state and data
  iterator) or initialise -> loop { global batch -> jitted train_step (donated state) -> log / checkpoint /
  sample grid / preemption } -> final checkpoint.

The train step is a pure function of (state, batch) under jax.jit with explicit in/out shardings: parameters
and optimizer state sharded by their logical axes (fsdp), the batch over the data axes. The same program runs
on 1 CPU device, 8 simulated devices or a multi-host TPU pod.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from busgen_jax import checkpoint, parallel, paths
from busgen_jax.data import pipeline
from busgen_jax.diffusion import objectives, samplers, schedule
from busgen_jax.models import card, lora, unet
from busgen_jax.train import loop, state as train_state, writers

def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_steps = 1000
  c.accum_steps = 1            # gradient accumulation: micro-batches per optimizer step
  c.log_every = 50
  c.checkpoint_every = 500
  c.keep_checkpoints = 3
  c.async_checkpoints = True
  c.sample_every = 0           # steps between sample grids in TensorBoard (0: never)
  c.num_samples = 16
  c.sampler = samplers.default_config()   # for the sample grids (official: DPM-Solver++ 3S, 50 steps, 2.8)
  c.start_stats_images = 1024   # training images whose mean grey level the card records (sampling starts there)
  c.init_from = ""             # a checkpoint directory to start from (e.g. `busgen-jax import-official` output)
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})
  c.sharding_rules = parallel.DEFAULT_RULES
  c.data = pipeline.default_config()
  c.model = unet.default_config()
  c.schedule = schedule.default_config()
  c.objective = objectives.default_config()
  c.optim = train_state.default_config()
  return c




# ------------------------------------------------------------------------------------------------ the step

def conditions(batch, model_cfg) -> dict:
  return {k: batch[k] for k in model_cfg.conditions}


def make_train_step(graphdef, sched: schedule.Schedule, cfg: ml_collections.ConfigDict,
                    tx: optax.GradientTransformation):
  """(state, batch[, frozen]) -> (state, metrics). A step whose loss or gradients are not finite changes nothing.

  `frozen` (LoRA adaptation) is the rest of the model's state, merged with the trained `state["params"]` (the
  adapters) inside the step: passed in, never differentiated, updated or copied."""

  def loss_fn(params, batch, key, frozen):
    model = nnx.merge(graphdef, params) if frozen is None else nnx.merge(graphdef, params, frozen)
    k_drop, k_cfg, k_loss = jax.random.split(key, 3)
    cond = objectives.drop_conditions(conditions(batch, cfg.model), k_cfg, cfg.objective.cond_drop_prob,
                                      cfg.objective.cond_drop_mode)
    rngs = nnx.Rngs(dropout=k_drop)
    eps_fn = lambda x, t, c: model(x, t, c, rngs=rngs, train=True)
    with lora.dropout(jax.random.fold_in(k_drop, 1)):
      return objectives.diffusion_loss(eps_fn, batch["image"], cond, k_loss, sched, cfg.objective)

  return make_update_step(loss_fn, cfg, tx)


def make_update_step(loss_fn, cfg: ml_collections.ConfigDict, tx: optax.GradientTransformation):
  """The optimizer step around `loss_fn(params, batch, key, frozen) -> loss`: gradient accumulation over
  cfg.accum_steps micro-batches, the optax update, EMA, and no change at all when the loss or gradients are not
  finite. `frozen` is passed through untouched (adaptation's base, distillation's teacher)."""
  lr = train_state.learning_rate(cfg.optim, cfg.num_steps)
  grad_fn = jax.value_and_grad(loss_fn)

  def step(state, batch, frozen=None):
    rng, key = jax.random.split(state["rng"])
    params = state["params"]
    n = cfg.accum_steps
    if n == 1:
      loss, grads = grad_fn(params, batch, key, frozen)
    else:  # micro-batch i takes rows i, i+n, ...: each device keeps its own rows
      micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1), batch)

      def acc(carry, xs):
        mb, k = xs
        l, g = grad_fn(params, mb, k, frozen)
        return jax.tree.map(jnp.add, carry, (l, g)), None

      zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
      (loss, grads), _ = jax.lax.scan(acc, zero, (micro, jax.random.split(key, n)))
      loss, grads = jax.tree.map(lambda x: x / n, (loss, grads))
    grad_norm = optax.global_norm(grads)

    def apply(state):
      updates, opt_state = tx.update(grads, state["opt_state"], state["params"], grad_norm=grad_norm)
      new_params = optax.apply_updates(state["params"], updates)
      return {"step": state["step"] + 1, "params": new_params,
              "ema": train_state.ema_update(state["ema"], new_params, state["step"], cfg.optim),
              "opt_state": opt_state, "rng": rng}

    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # A branch rather than a select per leaf: selecting between the updated and the old parameters, EMA and
    # optimizer moments re-read all of them every step (~0.1 s of the official 64 px step on 2 CPU cores).
    new = jax.lax.cond(finite, apply, lambda state: state, state)
    return new, {"loss": loss, "grad_norm": grad_norm, "lr": lr(state["step"]), "finite": finite}

  return step


# ------------------------------------------------------------------------------------------------ setup

class Setup:
  """Everything static about a run: mesh, model graph, shardings, the jitted step."""

  def __init__(self, cfg: ml_collections.ConfigDict, mesh=None):
    self.cfg = cfg
    self.mesh = mesh or parallel.make_mesh(dict(cfg.mesh))
    self.rules = parallel.Rules(cfg.sharding_rules)
    self.rules.check(self.mesh)
    parallel.check_batch_size(cfg.data.batch_size, self.mesh, self.rules)
    if cfg.data.batch_size % (cfg.accum_steps * parallel.data_parallel_size(self.mesh, self.rules)):
      raise ValueError(f"data.batch_size={cfg.data.batch_size} must be divisible by accum_steps x data-parallel "
                       f"size = {cfg.accum_steps} x {parallel.data_parallel_size(self.mesh, self.rules)}")
    abstract_model = unet.abstract(cfg.model)
    self.graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
    self.abstract_params = nnx.to_pure_dict(abstract_params)
    self.sched = schedule.Schedule.from_config(cfg.schedule)
    if self.sched.T != cfg.model.T:
      raise ValueError(f"schedule.T={self.sched.T} differs from model.T={cfg.model.T}")
    self.tx = train_state.optimizer(cfg.optim, cfg.num_steps)
    repl = parallel.replicated(self.mesh)
    param_sh = parallel.shardings(self.abstract_params, unet.param_axes(abstract_model), self.mesh, self.rules)
    abstract_state = jax.eval_shape(lambda p: train_state.init_state(p, self.tx, 0), self.abstract_params)
    opt_sh = optax.tree_map_params(self.tx, lambda _, sh: sh, abstract_state["opt_state"], param_sh,
                                   transform_non_params=lambda _: repl)
    self.state_shardings = {"step": repl, "params": param_sh, "ema": param_sh, "opt_state": opt_sh, "rng": repl}
    self.abstract_state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                       abstract_state, self.state_shardings)
    self.batch_keys = ("image", *cfg.model.conditions)
    self.batch_shardings = {
        k: parallel.batch_sharding(self.mesh, self.rules, 1 if k in ("pathology", "device") else 4)
        for k in self.batch_keys}
    self.train_step = self.jit_step(make_train_step(self.graphdef, self.sched, cfg, self.tx))

  def jit_step(self, step, *extra_shardings):
    """step(state, batch, *extra) under jax.jit: the state donated, the batch over the data axes, `extra` (a
    frozen teacher or base) in `extra_shardings`."""
    repl = parallel.replicated(self.mesh)
    return jax.jit(step, in_shardings=(self.state_shardings, self.batch_shardings, *extra_shardings),
                   out_shardings=(self.state_shardings, repl), donate_argnums=0)

  def init_state(self, seed: int, params=None) -> dict:
    """Fresh state, created directly in its shardings. `params` (host arrays) replace the initial weights."""
    if params is None:
      params = nnx.to_pure_dict(nnx.state(unet.create(self.cfg.model, seed), nnx.Param))
    _check_like(params, self.abstract_params)
    params = parallel.from_host(params, self.state_shardings["params"])
    init = jax.jit(lambda p: train_state.init_state(p, self.tx, seed), out_shardings=self.state_shardings)
    return init(params)

  def eps_fn(self, params):
    model = nnx.merge(self.graphdef, params)
    pred = self.cfg.objective.prediction
    return lambda x, t, c: objectives.eps_from_prediction(model(x, t, c), x, t, self.sched, pred)


def _check_like(params, abstract):
  got = {jax.tree_util.keystr(p): np.shape(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}
  want = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(abstract)}
  if got != want:
    diff = sorted(set(got.items()) ^ set(want.items()))[:6]
    raise ValueError(f"initial params do not match the model config: first differences {diff}")


# ------------------------------------------------------------------------------------------------ the loop

def train(cfg: ml_collections.ConfigDict, workdir: str | Path, *, stop_after: int | None = None) -> dict:
  """Train (resuming from the latest checkpoint in workdir/checkpoints). Returns the last logged metrics.

  `stop_after` ends the run abruptly after that many steps of this invocation, without a final
  checkpoint, as a crash would (tests use it)."""
  parallel.maybe_initialize_distributed()
  workdir = paths.path(workdir)   # local or gs://
  workdir.mkdir(parents=True, exist_ok=True)
  setup = Setup(cfg)
  pipe = pipeline.build(cfg.data)
  for field, rows in (("pathology", cfg.model.num_pathology), ("device", cfg.model.num_devices)):
    if field in cfg.model.conditions and len(pipe.vocab[field]) > rows:
      logging.warning("the data's %s vocabulary has %d names, the model %d rows: labels beyond are rejected "
                      "when they occur", field, len(pipe.vocab[field]), rows)
  ckpt = checkpoint.Checkpointer(workdir / "checkpoints", keep=cfg.keep_checkpoints, every=cfg.checkpoint_every,
                                 async_save=cfg.async_checkpoints, catch_sigterm=True)
  state, it = ckpt.restore_or_init(setup.abstract_state, pipe, lambda: setup.init_state(
      cfg.seed, checkpoint.load_params(cfg.init_from) if cfg.init_from else None))
  train_config = json.loads(cfg.to_json())
  model_card = card.Card(model=cfg.model.to_dict(), image_size=cfg.data.image_size, vocab=pipe.vocab,
                         train_config=train_config, untrained={"device": sorted(card.untrained_devices(
                             train_config, pipe.vocab.get("device", [])))},
                         image_mean=card.image_mean_stats(**pipeline.image_means(pipe, cfg.start_stats_images)))
  meta = model_card.to_meta()
  writer, progress = writers.create(str(workdir), cfg.num_steps, process_index=jax.process_index(),
                                    every_steps=cfg.log_every)

  def step_fn(state, local):
    check_labels(local, cfg.model)
    return setup.train_step(state, parallel.global_batch({k: local[k] for k in setup.batch_keys}, setup.mesh,
                                                         setup.rules))

  hooks = ()
  if cfg.sample_every:
    sample = _sampler(setup, cfg, model_card, pipe.vocab.get("device", []))
    hooks = (loop.Hook(cfg.sample_every, lambda step, state, local: writer.write_images(
        step, {"samples": writers.grid(sample(state["ema"], local, step))}), at_end=False),)
  _, _, last, _ = loop.run(state, it, step_fn, mesh=setup.mesh, ckpt=ckpt, writer=writer, progress=progress,
                           num_steps=cfg.num_steps, log_every=cfg.log_every, batch_size=cfg.data.batch_size,
                           meta=lambda: meta, hooks=hooks, stop_after=stop_after, name="diffusion")
  # The decay the EMA ended with: below optim.ema_decay when the warm-up's cap never reached it (a short run).
  return {**last, "ema_decay_last": float(train_state.ema_decay_at(cfg.optim, cfg.num_steps - 1, np))}


def check_labels(local, model_cfg):
  for field, rows in (("pathology", model_cfg.num_pathology), ("device", model_cfg.num_devices)):
    if field in model_cfg.conditions and local[field].max(initial=0) >= rows:
      raise ValueError(f"a batch has {field} index {local[field].max()} but model.num_{field}"
                       f"{'' if field == 'pathology' else 's'}={rows}: filter the data (data.sources.*.filters) "
                       f"or enlarge the embedding table")


def grid_sampler(sched: schedule.Schedule, sampler_cfg, n: int, image_size: int, eps_fn):
  """jitted (params, cond, start, key) -> n samples for TensorBoard's image summaries: the configured sampler with
  guidance. `eps_fn(params)` is the model's eps prediction (train's EMA, adapt's adapters over the frozen base)."""
  plan = samplers.plan_from_config(sched.betas, sampler_cfg)

  @jax.jit
  def run(params, cond, start, key):
    return samplers.sample_from_keys(plan, eps_fn(params), jax.random.split(key, n), (image_size, image_size, 3),
                                     cond=cond, guidance_scale=sampler_cfg.guidance_scale,
                                     clip_x0=sampler_cfg.clip_x0 or None, start=start,
                                     guidance_interval=tuple(sampler_cfg.guidance_interval))

  return run


def _sampler(setup: Setup, cfg, model_card: card.Card, devices: list[str]):
  """EMA samples for the image summaries, conditions from the batch."""
  n = min(cfg.num_samples, cfg.data.batch_size // jax.process_count())
  run = grid_sampler(setup.sched, cfg.sampler, n, cfg.data.image_size, setup.eps_fn)

  def sample(ema, local_batch, step):
    cond = {k: local_batch[k][:n] for k in cfg.model.conditions}
    first = model_card.start_rows([devices[d] for d in local_batch["device"][:n]], cfg.sampler.start)
    return np.asarray(run(ema, cond, first, jax.random.PRNGKey(step)))

  return sample
