"""Sampler plans: each sampler as a float64 table of model evaluations, computed on the host.

DDPM ancestral, DDIM and DPM-Solver / DPM-Solver++ (single-step and multistep, orders 1-3; time-uniform, logSNR
and time-quadratic spacing; Lu et al.'s `dpm_solver_pytorch.py` with its defaults). Row j of a plan says at which
integer timestep the model runs, its input as a linear combination of the anchor x (the solution at the last
completed step) and the last K model outputs, and the anchor update after it (plus a noise coefficient for
ancestral sampling). All step sizes, r1/r2 ratios and exponential integrator coefficients are therefore exact
float64 numbers whatever dtype the images use; diffusion/samplers.py runs a plan with one `lax.scan`.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

K = 3  # model outputs a plan may refer to (third-order solvers need three)

# ------------------------------------------------------------------------------------------------ plans

class Lin(dict):
  """A linear combination of the anchor "x" and model outputs (keys: global evaluation numbers)."""

  def __add__(self, other):
    out = Lin(self)
    for k, v in other.items():
      out[k] = out.get(k, 0.0) + v
    return out

  def __mul__(self, c):
    return Lin({k: v * float(c) for k, v in self.items()})

  __rmul__ = __mul__

  def __neg__(self):
    return self * -1.0

  def __sub__(self, other):
    return self + (-other)

  def __truediv__(self, c):
    return self * (1.0 / float(c))


X = Lin({"x": 1.0})


@dataclasses.dataclass(frozen=True)
class Plan:
  """J model evaluations. x0 plans convert eps to x0 = (x - sigma eps) / alpha at each evaluation."""
  predict: str            # "x0" (data prediction) | "eps"
  t_index: np.ndarray     # (J,) int32: the network's timestep
  alpha: np.ndarray       # (J,) alpha_t, sigma_t of the evaluation (continuous-time for DPM-Solver)
  sigma: np.ndarray
  in_x: np.ndarray        # (J,) model input = in_x * x + in_m @ buffer (buffer: last K outputs, newest last)
  in_m: np.ndarray        # (J, K)
  out_x: np.ndarray       # (J,) after the evaluation: x = out_x * x + out_m @ buffer + noise * z
  out_m: np.ndarray       # (J, K)
  noise: np.ndarray       # (J,)

  @property
  def num_evals(self) -> int:
    return len(self.t_index)


class _Builder:
  def __init__(self, predict: str):
    self.predict, self.rows = predict, []

  def model(self, t_index: int, alpha: float, sigma: float, inp: Lin) -> Lin:
    self.rows.append({"t": int(t_index), "alpha": float(alpha), "sigma": float(sigma), "in": inp,
                      "out": X, "noise": 0.0})
    return Lin({len(self.rows) - 1: 1.0})

  def update(self, x_new: Lin, noise: float = 0.0):
    self.rows[-1].update(out=x_new, noise=float(noise))

  def build(self) -> Plan:
    J = len(self.rows)
    a = {k: np.zeros(J) for k in ("alpha", "sigma", "in_x", "out_x", "noise")}
    in_m, out_m, t = np.zeros((J, K)), np.zeros((J, K)), np.zeros(J, np.int32)
    for j, r in enumerate(self.rows):
      t[j], a["alpha"][j], a["sigma"][j], a["noise"][j] = r["t"], r["alpha"], r["sigma"], r["noise"]
      for (which, lin, lag0, m) in (("in_x", r["in"], 1, in_m), ("out_x", r["out"], 0, out_m)):
        for g, c in lin.items():
          if g == "x":
            a[which][j] = c
            continue
          lag = j - g   # the buffer holds outputs j-K..j-1 before evaluation j, j-K+1..j after it
          if not lag0 <= lag < K + lag0:
            raise AssertionError(f"plan row {j} refers to evaluation {g}, outside the last {K}")
          m[j, K - 1 - lag + lag0] = c
    return Plan(self.predict, t, a["alpha"], a["sigma"], a["in_x"], in_m, a["out_x"], out_m, a["noise"])


def _interp(x, xp, fp):
  """Piecewise-linear interpolation with linear extrapolation beyond the ends (dpm_solver's interpolate_fn)."""
  x = np.asarray(x, np.float64)
  i = np.clip(np.searchsorted(xp, x), 1, len(xp) - 1)
  return fp[i - 1] + (x - xp[i - 1]) * (fp[i] - fp[i - 1]) / (xp[i] - xp[i - 1])


class VPSchedule:
  """DPM-Solver's NoiseScheduleVP("discrete"): step n of N sits at t = (n + 1) / N, log alpha piecewise linear.

  float32_table: build the log-alpha table as the official code does from its float32 betas,
  0.5 * cumsum(log(1 - betas)) in float32 (the log rounded correctly, so the table is the same on every
  machine). It moves samples by ~1e-6 relative, which is what float64 parity with the official sampler needs;
  False gives the float64 table."""

  def __init__(self, betas: np.ndarray, float32_table: bool = True):
    betas = np.asarray(betas, np.float64)
    self.N = len(betas)
    if float32_table:
      log1m = np.log((np.float32(1) - betas.astype(np.float32)).astype(np.float64)).astype(np.float32)
      self.log_alpha_array = (np.cumsum(log1m, dtype=np.float32) * np.float32(0.5)).astype(np.float64)
    else:
      self.log_alpha_array = 0.5 * np.cumsum(np.log(1.0 - betas))
    self.t_array = np.linspace(0.0, 1.0, self.N + 1)[1:]
    self.T, self.eps = 1.0, 1.0 / self.N

  def log_alpha(self, t):
    return _interp(t, self.t_array, self.log_alpha_array)

  def alpha(self, t):
    return np.exp(self.log_alpha(t))

  def sigma(self, t):
    return np.sqrt(1.0 - np.exp(2.0 * self.log_alpha(t)))

  def lam(self, t):
    la = self.log_alpha(t)
    return la - 0.5 * np.log(1.0 - np.exp(2.0 * la))

  def inverse_lambda(self, lam):
    log_alpha = -0.5 * np.logaddexp(0.0, -2.0 * np.asarray(lam, np.float64))
    return _interp(log_alpha, self.log_alpha_array[::-1], self.t_array[::-1])

  def t_index(self, t) -> int:
    """The official continuous -> integer conversion: floor((t - 1/N) * N)."""
    return int(np.clip(math.floor((float(t) - 1.0 / self.N) * self.N), 0, self.N - 1))

  def time_steps(self, skip_type: str, t_T: float, t_0: float, n: int) -> np.ndarray:
    if skip_type == "logSNR":
      return self.inverse_lambda(np.linspace(self.lam(t_T), self.lam(t_0), n + 1))
    if skip_type == "time_uniform":
      return np.linspace(t_T, t_0, n + 1)
    if skip_type == "time_quadratic":
      return np.linspace(t_T ** 0.5, t_0 ** 0.5, n + 1) ** 2
    raise ValueError(f"skip_type must be one of {SKIP_TYPES}, got {skip_type!r}")


SKIP_TYPES = ("time_uniform", "logSNR", "time_quadratic")


class _DPMSolver:
  """The update rules of dpm_solver_pytorch.py, written on Lin combinations instead of tensors."""

  def __init__(self, ns: VPSchedule, algorithm: str, solver_type: str):
    if algorithm not in ("dpmsolver", "dpmsolver++"):
      raise ValueError(f"algorithm must be 'dpmsolver' or 'dpmsolver++', got {algorithm!r}")
    if solver_type not in ("dpmsolver", "taylor"):
      raise ValueError(f"solver_type must be 'dpmsolver' or 'taylor', got {solver_type!r}")
    self.ns, self.pp, self.solver_type = ns, algorithm == "dpmsolver++", solver_type
    self.b = _Builder("x0" if self.pp else "eps")

  def model(self, t: float, inp: Lin) -> Lin:
    ns = self.ns
    return self.b.model(ns.t_index(t), ns.alpha(t), ns.sigma(t), inp)

  def _coeffs(self, s, t):
    ns = self.ns
    return ns.lam(t) - ns.lam(s), ns.sigma(s), ns.sigma(t), ns.alpha(t), ns.log_alpha(s), ns.log_alpha(t)

  def first(self, s, t, m_s: Lin) -> Lin:
    h, sig_s, sig_t, a_t, la_s, la_t = self._coeffs(s, t)
    if self.pp:
      return (sig_t / sig_s) * X - (a_t * np.expm1(-h)) * m_s
    return np.exp(la_t - la_s) * X - (sig_t * np.expm1(h)) * m_s

  def singlestep(self, s, t, order, r1=None, r2=None) -> Lin:
    ns = self.ns
    m_s = self.model(s, X)
    if order == 1:
      return self.first(s, t, m_s)
    h, sig_s, sig_t, a_t, la_s, la_t = self._coeffs(s, t)
    lam_s = ns.lam(s)
    if order == 2:
      r1 = 0.5 if r1 is None else r1
      s1 = ns.inverse_lambda(lam_s + r1 * h)
      sig_s1, a_s1, la_s1 = ns.sigma(s1), ns.alpha(s1), ns.log_alpha(s1)
      if self.pp:
        phi_11, phi_1 = np.expm1(-r1 * h), np.expm1(-h)
        m_s1 = self.model(s1, (sig_s1 / sig_s) * X - (a_s1 * phi_11) * m_s)
        base = (sig_t / sig_s) * X - (a_t * phi_1) * m_s
        if self.solver_type == "dpmsolver":
          return base - (0.5 / r1) * (a_t * phi_1) * (m_s1 - m_s)
        return base + (1.0 / r1) * (a_t * (phi_1 / h + 1.0)) * (m_s1 - m_s)
      phi_11, phi_1 = np.expm1(r1 * h), np.expm1(h)
      m_s1 = self.model(s1, np.exp(la_s1 - la_s) * X - (sig_s1 * phi_11) * m_s)
      base = np.exp(la_t - la_s) * X - (sig_t * phi_1) * m_s
      if self.solver_type == "dpmsolver":
        return base - (0.5 / r1) * (sig_t * phi_1) * (m_s1 - m_s)
      return base - (1.0 / r1) * (sig_t * (phi_1 / h - 1.0)) * (m_s1 - m_s)
    if order != 3:
      raise ValueError(f"order must be 1, 2 or 3, got {order}")
    r1 = 1.0 / 3.0 if r1 is None else r1
    r2 = 2.0 / 3.0 if r2 is None else r2
    s1, s2 = ns.inverse_lambda(lam_s + r1 * h), ns.inverse_lambda(lam_s + r2 * h)
    sig_s1, sig_s2 = ns.sigma(s1), ns.sigma(s2)
    if self.pp:
      a_s1, a_s2 = ns.alpha(s1), ns.alpha(s2)
      phi_11, phi_12, phi_1 = np.expm1(-r1 * h), np.expm1(-r2 * h), np.expm1(-h)
      phi_22 = np.expm1(-r2 * h) / (r2 * h) + 1.0
      phi_2 = phi_1 / h + 1.0
      phi_3 = phi_2 / h - 0.5
      m_s1 = self.model(s1, (sig_s1 / sig_s) * X - (a_s1 * phi_11) * m_s)
      m_s2 = self.model(s2, (sig_s2 / sig_s) * X - (a_s2 * phi_12) * m_s
                        + (r2 / r1) * (a_s2 * phi_22) * (m_s1 - m_s))
      base = (sig_t / sig_s) * X - (a_t * phi_1) * m_s
      if self.solver_type == "dpmsolver":
        return base + (1.0 / r2) * (a_t * phi_2) * (m_s2 - m_s)
      D1, D2 = self._taylor_d(m_s, m_s1, m_s2, r1, r2)
      return base + (a_t * phi_2) * D1 - (a_t * phi_3) * D2
    la_s1, la_s2 = ns.log_alpha(s1), ns.log_alpha(s2)
    phi_11, phi_12, phi_1 = np.expm1(r1 * h), np.expm1(r2 * h), np.expm1(h)
    phi_22 = np.expm1(r2 * h) / (r2 * h) - 1.0
    phi_2 = phi_1 / h - 1.0
    phi_3 = phi_2 / h - 0.5
    m_s1 = self.model(s1, np.exp(la_s1 - la_s) * X - (sig_s1 * phi_11) * m_s)
    m_s2 = self.model(s2, np.exp(la_s2 - la_s) * X - (sig_s2 * phi_12) * m_s
                      - (r2 / r1) * (sig_s2 * phi_22) * (m_s1 - m_s))
    base = np.exp(la_t - la_s) * X - (sig_t * phi_1) * m_s
    if self.solver_type == "dpmsolver":
      return base - (1.0 / r2) * (sig_t * phi_2) * (m_s2 - m_s)
    D1, D2 = self._taylor_d(m_s, m_s1, m_s2, r1, r2)
    return base - (sig_t * phi_2) * D1 - (sig_t * phi_3) * D2

  @staticmethod
  def _taylor_d(m_s, m_s1, m_s2, r1, r2):
    D1_0, D1_1 = (1.0 / r1) * (m_s1 - m_s), (1.0 / r2) * (m_s2 - m_s)
    return (r2 * D1_0 - r1 * D1_1) / (r2 - r1), 2.0 * (D1_1 - D1_0) / (r2 - r1)

  def multistep(self, m_prev: list, t_prev: list, t, order) -> Lin:
    ns = self.ns
    if order == 1:
      return self.first(t_prev[-1], t, m_prev[-1])
    h, sig_p0, sig_t, a_t, la_p0, la_t = self._coeffs(t_prev[-1], t)
    lam_p = [ns.lam(tp) for tp in t_prev]
    base_pp = (sig_t / sig_p0) * X
    base_eps = np.exp(la_t - la_p0) * X
    if order == 2:
      r0 = (lam_p[-1] - lam_p[-2]) / h
      D1_0 = (1.0 / r0) * (m_prev[-1] - m_prev[-2])
      if self.pp:
        phi_1 = np.expm1(-h)
        out = base_pp - (a_t * phi_1) * m_prev[-1]
        if self.solver_type == "dpmsolver":
          return out - 0.5 * (a_t * phi_1) * D1_0
        return out + (a_t * (phi_1 / h + 1.0)) * D1_0
      phi_1 = np.expm1(h)
      out = base_eps - (sig_t * phi_1) * m_prev[-1]
      if self.solver_type == "dpmsolver":
        return out - 0.5 * (sig_t * phi_1) * D1_0
      return out - (sig_t * (phi_1 / h - 1.0)) * D1_0
    if order != 3:
      raise ValueError(f"order must be 1, 2 or 3, got {order}")
    r0, r1 = (lam_p[-1] - lam_p[-2]) / h, (lam_p[-2] - lam_p[-3]) / h
    D1_0 = (1.0 / r0) * (m_prev[-1] - m_prev[-2])
    D1_1 = (1.0 / r1) * (m_prev[-2] - m_prev[-3])
    D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
    D2 = (1.0 / (r0 + r1)) * (D1_0 - D1_1)
    if self.pp:
      phi_1 = np.expm1(-h)
      phi_2 = phi_1 / h + 1.0
      phi_3 = phi_2 / h - 0.5
      return base_pp - (a_t * phi_1) * m_prev[-1] + (a_t * phi_2) * D1 - (a_t * phi_3) * D2
    phi_1 = np.expm1(h)
    phi_2 = phi_1 / h - 1.0
    phi_3 = phi_2 / h - 0.5
    return base_eps - (sig_t * phi_1) * m_prev[-1] - (sig_t * phi_2) * D1 - (sig_t * phi_3) * D2


def _singlestep_orders(steps: int, order: int) -> list[int]:
  if order == 3:
    k = steps // 3 + 1
    return {0: [3] * (k - 2) + [2, 1], 1: [3] * (k - 1) + [1], 2: [3] * (k - 1) + [2]}[steps % 3]
  if order == 2:
    return [2] * (steps // 2) + ([1] if steps % 2 else [])
  if order == 1:
    return [1] * steps
  raise ValueError(f"order must be 1, 2 or 3, got {order}")


# The official DPM-Solver code ends multistep plans with lower orders only when they have fewer steps than this.
OFFICIAL_LOWER_ORDER_FINAL_BELOW = 10


def dpm_solver_plan(betas, *, steps: int = 20, order: int = 2, skip_type: str = "time_uniform",
                    method: str = "multistep", algorithm: str = "dpmsolver++", lower_order_final: bool = True,
                    solver_type: str = "dpmsolver", t_start: float | None = None, t_end: float | None = None,
                    denoise_to_zero: bool = False,
                    lower_order_final_below: int = OFFICIAL_LOWER_ORDER_FINAL_BELOW) -> Plan:
  """DPM_Solver.sample(...) of dpm_solver_pytorch.py as a plan (same arguments and defaults).

  lower_order_final_below: multistep plans of fewer steps than this end with lower orders (the last step first
  order). The official code's 10 (its docstring says 15); at exactly 10 steps its last step, from t ~ 0.1 to
  t_end, is then second order, which leaves a small-amplitude artefact a trained encoder reads (docs/SAMPLING.md)."""
  ns = VPSchedule(betas)
  t_T = ns.T if t_start is None else t_start
  t_0 = ns.eps if t_end is None else t_end
  if not 0 < t_0 < t_T <= 1:
    raise ValueError(f"need 0 < t_end < t_start <= 1, got t_end={t_0}, t_start={t_T}")
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")
  sv = _DPMSolver(ns, algorithm, solver_type)
  if method == "multistep":
    if steps < order:
      raise ValueError(f"multistep order {order} needs steps >= order, got steps={steps}")
    ts = ns.time_steps(skip_type, t_T, t_0, steps)
    t_prev, m_prev = [ts[0]], [sv.model(ts[0], X)]
    for step in range(1, order):          # warm-up with lower orders
      sv.b.update(sv.multistep(m_prev, t_prev, ts[step], step))
      t_prev.append(ts[step])
      m_prev.append(sv.model(ts[step], X))
    for step in range(order, steps + 1):
      step_order = (min(order, steps + 1 - step) if lower_order_final and steps < lower_order_final_below
                    else order)
      sv.b.update(sv.multistep(m_prev, t_prev, ts[step], step_order))
      t_prev, m_prev = t_prev[1:] + [ts[step]], m_prev[1:] + [m_prev[-1]]
      if step < steps:
        m_prev[-1] = sv.model(ts[step], X)
  elif method in ("singlestep", "singlestep_fixed"):
    if method == "singlestep":
      orders = _singlestep_orders(steps, order)
      if skip_type == "logSNR":           # as in the DPM-Solver paper
        outer = ns.time_steps(skip_type, t_T, t_0, len(orders))
      else:
        outer = ns.time_steps(skip_type, t_T, t_0, steps)[np.cumsum([0] + orders)]
    else:
      orders = [order] * (steps // order)
      outer = ns.time_steps(skip_type, t_T, t_0, len(orders))
    for i, o in enumerate(orders):
      s, t = outer[i], outer[i + 1]
      lam_inner = ns.lam(ns.time_steps(skip_type, s, t, o))
      h = lam_inner[-1] - lam_inner[0]
      r1 = None if o <= 1 else (lam_inner[1] - lam_inner[0]) / h
      r2 = None if o <= 2 else (lam_inner[2] - lam_inner[0]) / h
      sv.b.update(sv.singlestep(s, t, o, r1, r2))
  else:
    raise ValueError(f"method must be 'singlestep', 'multistep' or 'singlestep_fixed', got {method!r}")
  if denoise_to_zero:                     # one more evaluation at t_0; x becomes its x0 prediction
    m = sv.model(t_0, X)
    a, s = ns.alpha(t_0), ns.sigma(t_0)
    sv.b.update(m if sv.pp else X / a - (s / a) * m)
  return sv.b.build()


def ddim_grid(T: int, steps: int) -> np.ndarray:
  """`steps` evenly spaced integer timesteps T-1 .. 0."""
  if not 1 <= steps <= T:
    raise ValueError(f"steps must be in [1, {T}], got {steps}")
  return np.linspace(T - 1, 0, steps).round().astype(np.int32)


def ddim_plan(betas, *, steps: int = 50, eta: float = 0.0, grid=()) -> Plan:
  """DDIM over `steps` evenly spaced integer timesteps T-1 .. 0 (eta=1: ancestral DDPM posterior sampling), or over
  `grid`, strictly decreasing timesteps (a progressive-distillation student's own)."""
  ab = np.cumprod(1.0 - np.asarray(betas, np.float64))
  T = len(ab)
  if len(grid):
    ts = np.asarray(grid, np.int32)
    if ts.ndim != 1 or ts.min() < 0 or ts.max() >= T or np.any(np.diff(ts) >= 0):
      raise ValueError(f"a DDIM grid must be strictly decreasing timesteps in [0, {T}), got {list(grid)}")
    steps = len(ts)
  else:
    ts = ddim_grid(T, steps)
  b = _Builder("x0")
  for i, t in enumerate(ts):
    a_t, a_p = ab[t], (ab[ts[i + 1]] if i + 1 < steps else 1.0)
    m = b.model(t, np.sqrt(a_t), np.sqrt(1.0 - a_t), X)
    sig = eta * np.sqrt((1.0 - a_p) / (1.0 - a_t) * (1.0 - a_t / a_p))
    c = np.sqrt(max(1.0 - a_p - sig ** 2, 0.0))
    # x_prev = sqrt(a_p) x0 + c eps + sig z, with eps = (x - sqrt(a_t) x0) / sqrt(1 - a_t)
    b.update((c / np.sqrt(1.0 - a_t)) * X + (np.sqrt(a_p) - c * np.sqrt(a_t) / np.sqrt(1.0 - a_t)) * m, sig)
  return b.build()


def ddpm_plan(betas, *, steps: int | None = None) -> Plan:
  """Ancestral DDPM: x_{t-1} ~ q(x_{t-1} | x_t, x0_pred), every timestep unless `steps` respaces it."""
  return ddim_plan(betas, steps=len(betas) if steps is None else steps, eta=1.0)
