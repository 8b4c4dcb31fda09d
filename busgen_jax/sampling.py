"""The public sampling API: any noise-prediction function, any sampler, with classifier-free guidance.

  from busgen_jax.sampling import sample_with_eps_fn
  x0 = sample_with_eps_fn(eps_fn, x_T, betas=betas, cond=c, uncond=u, guidance_scale=2.8,
                          algorithm="dpmsolver++", method="singlestep", order=3, steps=50,
                          skip_type="time_uniform")

`eps_fn(x, t_index, cond)` may be one of our models, an imported official model or an analytic function.
"""

from busgen_jax.diffusion.samplers import (  # noqa: F401
    ALGORITHMS, SKIP_TYPES, Plan, VPSchedule, ddim_plan, ddpm_plan, dpm_solver_plan, guided, make_plan, run,
    sample_from_keys, sample_with_eps_fn)
