"""Noise schedules: betas, cumulative alphas, SNR. Discrete steps t = 0..T-1 as in the official code."""

from __future__ import annotations

import math

import ml_collections
import numpy as np


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.kind = "linear"        # "linear" (official: 1e-4 .. 0.028) | "cosine" (Nichol & Dhariwal)
  c.T = 500
  c.beta_1 = 1e-4
  c.beta_T = 0.028
  c.cosine_s = 0.008
  return c


def _linear(c):
  return np.linspace(c.beta_1, c.beta_T, c.T, dtype=np.float64)


def _cosine(c):
  f = lambda t: math.cos((t / c.T + c.cosine_s) / (1 + c.cosine_s) * math.pi / 2) ** 2
  return np.array([min(1 - f(t + 1) / f(t), 0.999) for t in range(c.T)], np.float64)


BETAS = {"linear": _linear, "cosine": _cosine}


def betas(c: ml_collections.ConfigDict) -> np.ndarray:
  if c.kind not in BETAS:
    raise ValueError(f"diffusion.schedule.kind must be one of {sorted(BETAS)}, got {c.kind!r}")
  return BETAS[c.kind](c)


class Schedule:
  """float64 tables of a discrete schedule (cast where used)."""

  def __init__(self, betas: np.ndarray):
    self.betas = np.asarray(betas, np.float64)
    self.T = len(self.betas)
    self.alphas_cumprod = np.cumprod(1.0 - self.betas)
    self.sqrt_ab = np.sqrt(self.alphas_cumprod)
    self.sqrt_1m_ab = np.sqrt(1.0 - self.alphas_cumprod)
    self.snr = self.alphas_cumprod / (1.0 - self.alphas_cumprod)

  @classmethod
  def from_config(cls, c: ml_collections.ConfigDict) -> "Schedule":
    return cls(betas(c))
