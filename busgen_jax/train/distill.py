"""Distillation into a few-step sampler: `busgen-jax distill --config configs/distill.py --workdir DIR
--config.teacher=CKPT`. Read top to bottom:

  the teacher through the one loader (its card) -> the student's config (the teacher's UNet with a guidance input,
  its schedule and objective) -> the teacher's training data (or the data given) -> diffusion.Setup's mesh,
  shardings and jitted update step, the teacher's parameters sharded beside it -> restore the latest checkpoint
  or initialise the student from the teacher -> loop -> checkpoints whose card says whose student it is and
  which plan it samples with.

Why guidance distillation, then progressive distillation (Meng et al. 2023, two stages), rather than consistency
distillation: the first stage alone halves every sampler's cost (one evaluation per solver step instead of the
conditional + unconditional pair) and keeps every solver usable, so DPM-Solver++ at 8 steps is 8 evaluations;
each progressive round then halves a DDIM grid with a plain regression whose target is exact (two teacher DDIM
steps), needs no extra hyperparameters (consistency distillation's EMA target, metric and boundary
parameterisation) and starts from a student that already samples well, which matters at CPU scale where a
round gets a few hundred steps. The math is diffusion/distill.py.

  kind=guidance     a plain teacher -> a student with the guidance scale as an input; its card's plan is
                    `sampler` (default DPM-Solver++ 2M, 8 steps: 8 evaluations per image)
  kind=progressive  a teacher's DDIM grid of `teacher_steps` (a progressive student: its own grid) -> half as
                    many steps; the teacher is a guidance student (one evaluation per step) or a plain model
                    (guided, two); the card's plan is DDIM on the student's grid
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from busgen_jax import checkpoint, parallel, paths
from busgen_jax.data import pipeline
from busgen_jax.diffusion import distill as distill_lib, objectives, plans, samplers, schedule
from busgen_jax.models import card, unet
from busgen_jax.train import diffusion, loop, writers

KINDS = tuple(distill_lib.LOSSES)


def default_config() -> ml_collections.ConfigDict:
  c = diffusion.default_config()
  # The student's model, schedule and objective are the teacher's (from its card): not settable here.
  for key in ("model", "schedule", "objective", "init_from", "sample_every", "num_samples", "start_stats_images"):
    del c[key]
  c.teacher = ""                    # a diffusion checkpoint directory (train's checkpoints, a merged export, a student)
  c.teacher_which = "ema"
  c.teacher_step = -1               # -1: the latest
  c.kind = "guidance"               # guidance | progressive
  c.guidance_range = (1.0, 4.0)     # the student learns every guidance scale in this range (official 2.8)
  c.teacher_steps = 16              # progressive, plain or guidance-student teacher: its DDIM steps (even)
  # kind=guidance: the plan the card names for sampling (`sample` runs it; --config.sampler.student_plan=config
  # samples with another). Only samplers.PLAN_KEYS are recorded.
  c.sampler = samplers.default_config()
  c.sampler.update(algorithm="dpmsolver++", method="multistep", order=2, steps=8)
  c.num_steps = 2000
  c.checkpoint_every = 250
  c.data.sources.real.path = ""     # "": the teacher's own training data (its card)
  c.optim.update(lr=1e-4, warmup_steps=50, ema_decay=0.999)
  return c


# ------------------------------------------------------------------------------------------------ the teacher

def _teacher(cfg) -> card.Model:
  if not cfg.teacher:
    raise ValueError("--config.teacher is required: the checkpoint directory of the model to distill")
  if cfg.kind not in KINDS:
    raise ValueError(f"--config.kind must be one of {KINDS}, got {cfg.kind!r}")
  lo, hi = (float(v) for v in cfg.guidance_range)
  if not 0 < lo <= hi:
    raise ValueError(f"--config.guidance_range must be (low, high) with 0 < low <= high, got {cfg.guidance_range}")
  return card.load(cfg.teacher, which=cfg.teacher_which, step=None if cfg.teacher_step < 0 else cfg.teacher_step)


def teacher_grid(cfg, teacher: card.Model) -> np.ndarray:
  """The DDIM grid a progressive round halves: a progressive student's own, else `teacher_steps` even steps."""
  student = teacher.card.student or {}
  if student.get("kind") == "progressive":
    return np.asarray(student["sampler"]["grid"], np.int32)
  return plans.ddim_grid(teacher.cfg.T, cfg.teacher_steps)


def run_config(cfg, teacher: card.Model) -> ml_collections.ConfigDict:
  """The full training config of this run: cfg plus the teacher's model (with a guidance input), schedule,
  objective and (unless given) data sources, at the teacher's image size."""
  tc = teacher.train_config
  rc = ml_collections.ConfigDict(cfg.to_dict())
  rc.model = ml_collections.ConfigDict({**unet.default_config().to_dict(), **teacher.card.model,
                                        "guidance_embed": True, "dropout": 0.0})
  rc.schedule = schedule.default_config()
  rc.schedule.update(tc.get("schedule", {}))
  rc.objective = objectives.default_config()
  rc.objective.update(tc.get("objective", {}))
  rc.data.image_size = teacher.image_size
  if not any(s.path for s in rc.data.sources.values()):
    given = (tc.get("data") or {}).get("sources")
    if not given or not any(s.get("path") for s in given.values()):
      raise ValueError(f"{cfg.teacher}: the teacher's card records no training data: give "
                       "--config.data.sources.real.path=DATASET")
    rc.data.sources = ml_collections.ConfigDict(given)
    logging.info("data: the teacher's training data %s", [s.get("path") for s in given.values()])
  return rc


def student_card(cfg, rc, teacher: card.Model, vocab: dict, grid) -> card.Card:
  """grid: the teacher's DDIM grid a progressive round halves (None for guidance distillation)."""
  kind = cfg.kind
  if kind == "guidance":
    plan = {k: cfg.sampler[k] for k in samplers.PLAN_KEYS}
  else:
    grid = distill_lib.student_grid(grid)
    plan = {"algorithm": "ddim", "method": "singlestep", "order": 1, "steps": len(grid), "skip_type": "time_uniform",
            "lower_order_final": True,
            "lower_order_final_below": plans.OFFICIAL_LOWER_ORDER_FINAL_BELOW, "eta": 0.0, "grid": grid.tolist()}
  lineage = (teacher.card.student or {}).get("lineage", []) + [{
      "kind": kind, "teacher": teacher.name, "teacher_step": teacher.step, "checkpoint": str(cfg.teacher)}]
  return card.Card(model=rc.model.to_dict(), image_size=teacher.image_size, vocab=vocab,
                   train_config=json.loads(rc.to_json()), untrained=teacher.card.untrained, task=teacher.task,
                   image_mean=teacher.card.image_mean,
                   student={"kind": kind, "teacher": teacher.name, "teacher_step": teacher.step,
                            "guidance_range": [float(v) for v in cfg.guidance_range],
                            "sampler": {k: (list(v) if isinstance(v, tuple) else v) for k, v in plan.items()},
                            "network_evals": int(plan["steps"]), "lineage": lineage})


# ------------------------------------------------------------------------------------------------ the step

def make_loss(setup: diffusion.Setup, teacher_graphdef, teacher_is_student: bool, rc, grid):
  """loss(params, batch, key, teacher_params) of this kind."""
  pred = rc.objective.prediction
  sched = setup.sched
  w_range = tuple(float(v) for v in rc.guidance_range)

  def loss_fn(params, batch, key, teacher_params):
    student_net = nnx.merge(setup.graphdef, params)
    teacher_net = nnx.merge(teacher_graphdef, teacher_params)
    eps = lambda net: lambda x, t, c: objectives.eps_from_prediction(net(x, t, c), x, t, sched, pred)
    teacher = distill_lib.guided_teacher(eps(teacher_net), teacher_is_student)
    cond = diffusion.conditions(batch, rc.model)
    if rc.kind == "guidance":
      return distill_lib.guidance_loss(eps(student_net), teacher, batch["image"], cond, key, sched, w_range)
    return distill_lib.progressive_loss(eps(student_net), teacher, batch["image"], cond, key, sched, w_range, grid)

  return loss_fn


# ------------------------------------------------------------------------------------------------ the loop

def distill(cfg: ml_collections.ConfigDict, workdir: str | Path, *, stop_after: int | None = None) -> dict:
  """Distil (resuming from the latest checkpoint in workdir/checkpoints). Returns a summary."""
  t_start = time.time()
  parallel.maybe_initialize_distributed()
  workdir = paths.path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  teacher = _teacher(cfg)
  teacher_is_student = bool(teacher.cfg.get("guidance_embed", False))
  if cfg.kind == "guidance" and teacher_is_student:
    raise ValueError(f"{cfg.teacher} is already a guidance student: distil it further with --config.kind=progressive")
  grid = teacher_grid(cfg, teacher) if cfg.kind == "progressive" else None
  if grid is not None:
    distill_lib.student_grid(grid)   # an odd grid fails here, before any data or compilation
  rc = run_config(cfg, teacher)
  setup = diffusion.Setup(rc)
  pipe = pipeline.build(rc.data)
  for field in ("pathology", "device"):
    if field in rc.model.conditions and list(pipe.vocab[field]) != list(teacher.vocab[field])[:len(pipe.vocab[field])]:
      raise ValueError(f"the data's {field} vocabulary {pipe.vocab[field]} differs from the teacher's "
                       f"{teacher.vocab[field]}: distil on data labelled as the teacher's training data was")
  # The teacher, sharded by its own logical axes beside the student.
  t_abstract = unet.abstract(teacher.cfg)
  t_graphdef = nnx.graphdef(t_abstract)
  t_sh = parallel.shardings(teacher.params, unet.param_axes(t_abstract), setup.mesh, setup.rules)
  t_params = parallel.from_host(teacher.params, t_sh)
  step = setup.jit_step(diffusion.make_update_step(make_loss(setup, t_graphdef, teacher_is_student, rc, grid),
                                                   rc, setup.tx), t_sh)

  def init():   # every parameter the teacher has, the guidance input's fresh (zero-initialised output)
    fresh = nnx.to_pure_dict(nnx.state(unet.create(rc.model, rc.seed), nnx.Param))
    flat = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(teacher.params)}
    params = jax.tree_util.tree_map_with_path(lambda p, x: flat.get(jax.tree_util.keystr(p), x), fresh)
    return setup.init_state(rc.seed, params)

  ckpt = checkpoint.Checkpointer(workdir / "checkpoints", keep=rc.keep_checkpoints, every=rc.checkpoint_every,
                                 async_save=rc.async_checkpoints, catch_sigterm=True)
  state, it = ckpt.restore_or_init(setup.abstract_state, pipe, init)
  model_card = student_card(cfg, rc, teacher, teacher.vocab, grid)
  meta = model_card.to_meta()
  writer, progress = writers.create(str(workdir), rc.num_steps, process_index=jax.process_index(),
                                    every_steps=rc.log_every)
  logging.info("distilling %s (%s, step %d) into a %s student: %s", teacher.name, "student" if teacher_is_student
               else "guided", teacher.step, cfg.kind, model_card.student["sampler"])

  def step_fn(state, local):
    diffusion.check_labels(local, rc.model)
    return step(state, parallel.global_batch({k: local[k] for k in setup.batch_keys}, setup.mesh, setup.rules),
                t_params)

  _, last_step, last, complete = loop.run(
      state, it, step_fn, mesh=setup.mesh, ckpt=ckpt, writer=writer, progress=progress, num_steps=rc.num_steps,
      log_every=rc.log_every, batch_size=rc.data.batch_size, meta=lambda: meta, stop_after=stop_after,
      name=f"distill {cfg.kind}")
  summary = {"kind": cfg.kind, "teacher": teacher.name, "teacher_step": teacher.step, "step": last_step,
             "complete": complete, "student": model_card.student, "checkpoints": str(workdir / "checkpoints"),
             "last": last, "seconds": time.time() - t_start}
  if jax.process_index() == 0:
    (workdir / "distill.json").write_text(json.dumps(summary, indent=1))
  return summary
