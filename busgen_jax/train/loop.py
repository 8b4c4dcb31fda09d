"""The one loop skeleton of the trainers: diffusion pretraining, adaptation and classifiers.

Each trainer builds its own state, data iterator, jitted step and checkpointer, then hands them to `run`, which
owns what they used to repeat: the mesh context, the finiteness checks (of the previous step while the current
one runs, so the host never waits on the device for it), throughput and host-memory scalars every `log_every`
steps, hooks every k steps (validation, sample grids), checkpoints with the preemption exit, the simulated
crash of the reliability tests, and closing the writer, checkpointer and iterator whatever happens.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
from absl import logging

from busgen_jax import console
from busgen_jax.train import writers


class NonFiniteError(FloatingPointError):
  """A non-finite loss or gradient: the step was not applied, the last good checkpoint is kept."""


class SimulatedCrash(RuntimeError):
  """`stop_after` ends a run as a crash would (the reliability tests)."""


@dataclasses.dataclass(frozen=True)
class Hook:
  every: int                                       # call fn(step, state, local_batch) every this many steps
  fn: Callable[[int, Any, dict | None], None]
  at_end: bool = True                              # and after the last step
  at_start: bool = False                           # and before the first step of a fresh run (local_batch None)


def check_finite(step: int, metrics: dict, ckpt) -> None:
  if not bool(metrics["finite"]):
    raise NonFiniteError(f"non-finite loss or gradients at step {step} (loss={float(metrics['loss'])}, "
                         f"grad_norm={float(metrics['grad_norm'])}); the step was not applied and the last good "
                         f"checkpoint (step {ckpt.latest_step()}) is kept")


def run(state, it, step_fn: Callable[[Any, dict], tuple[Any, dict]], *, mesh, ckpt, writer, progress,
        num_steps: int, log_every: int, batch_size: int, meta: Callable[[], dict], hooks: tuple[Hook, ...] = (),
        stop_after: int | None = None, name: str = "train") -> tuple[Any, int, dict, bool]:
  """Steps `state` with `step_fn(state, local_batch) -> (state, metrics)` from its step to `num_steps`. `meta()`
  is saved with each checkpoint. Returns (state, step, the last logged scalars, complete: False after a
  preemption)."""
  step = start = first = int(state["step"])
  pending, last, t0, complete = None, {}, time.perf_counter(), True
  bar = console.bar(num_steps, name, initial=step)
  try:
    with jax.set_mesh(mesh):
      for hook in hooks:
        if hook.at_start and step == 0:
          hook.fn(0, state, None)
      while step < num_steps:
        local = next(it)
        state, metrics = step_fn(state, local)
        step += 1
        if pending is not None:           # check the previous step while this one runs
          check_finite(*pending, ckpt)
        pending = (step, metrics)
        progress(step)
        bar.update(1)
        final = step == num_steps
        if step % log_every == 0 or final:
          check_finite(step, metrics, ckpt)
          dt = time.perf_counter() - t0
          last = {k: float(v) for k, v in metrics.items() if k != "finite"}
          last["images_per_sec"] = batch_size * (step - start) / dt
          last["host_rss_gib"] = writers.host_rss_gib()
          writer.write_scalars(step, last)
          bar.set_postfix_str(f"loss {last['loss']:.4g}", refresh=False)
          start, t0 = step, time.perf_counter()
        for hook in hooks:
          if step % hook.every == 0 or (final and hook.at_end):
            check_finite(step, metrics, ckpt)
            hook.fn(step, state, local)
        if ckpt.should_save(step) or final:
          check_finite(step, metrics, ckpt)
          ckpt.save(step, state, it, meta())
          if ckpt.reached_preemption(step):
            logging.warning("preemption signal: saved step %d, exiting", step)
            complete = False
            break
        if stop_after is not None and step - first >= stop_after:
          raise SimulatedCrash(f"stop_after={stop_after}: stopped abruptly at step {step}")
  except BaseException:
    _close(bar.close, writer.flush, ckpt.close, it.close, after_error=True)
    raise
  _close(bar.close, writer.flush, ckpt.close, it.close)
  return state, step, last, complete


def _close(*closers: Callable[[], Any], after_error: bool = False) -> None:
  """Calls every closer, even when one fails (the checkpointer still waits for its save when the writer's sync
  failed). After an error, a failing closer (a bucket that went away fails the writer's sync and the checkpointer's
  close again) is logged: the error that stopped the run is the one raised. Otherwise the first failure is raised
  once all have run."""
  first = None
  for close in closers:
    try:
      close()
    except Exception as e:  # noqa: BLE001
      name = getattr(close, "__qualname__", close)
      if after_error:
        logging.warning("%s after the run's error failed too: %s: %s", name, type(e).__name__, e)
      elif first is None:
        first = e
      else:
        logging.warning("%s failed too: %s: %s", name, type(e).__name__, e)
  if first is not None:
    raise first
