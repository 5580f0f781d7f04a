"""The sampler maths pinned against closed forms and against diffusers' own schedulers."""

from __future__ import annotations

import pytest
import torch

from pgraft_cli.errors import PgraftError
from pgraft_cli.core.samplers import NoiseSchedule, invert, invert_ddim, invert_sampler, sample, sample_heun

PREDICTIONS = ["epsilon", "v_prediction", "sample"]


def native_prediction(schedule: NoiseSchedule, x0, e, t):
    """What a perfect network predicts at time t for x_t = a x0 + s e, in the schedule's type."""
    a, s = (v.float() for v in schedule.alpha_sigma(torch.tensor(t, dtype=torch.float64)))
    return {"flow": e - x0, "epsilon": e, "v_prediction": a * e - s * x0, "sample": x0}[schedule.prediction_type]


@pytest.mark.parametrize("schedule", [NoiseSchedule.flow()] + [NoiseSchedule.diffusion(p) for p in PREDICTIONS])
@pytest.mark.parametrize("t", [0.9, 0.5, 0.13])
def test_to_x0_eps_inverts_every_parameterisation(schedule, t):
    g = torch.Generator().manual_seed(0)
    x0, e = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    a, s = (v.float() for v in schedule.alpha_sigma(torch.tensor(t, dtype=torch.float64)))
    x = a * x0 + s * e
    x0_hat, e_hat = schedule.to_x0_eps(x, native_prediction(schedule, x0, e, t), torch.tensor(t, dtype=torch.float64))
    torch.testing.assert_close(x0_hat, x0, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(e_hat, e, atol=2e-5, rtol=1e-4)


def test_flow_schedule_is_linear_interpolation():
    schedule = NoiseSchedule.flow()
    t = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64)
    a, s = schedule.alpha_sigma(t)
    torch.testing.assert_close(a, 1 - t)
    torch.testing.assert_close(s, t)
    assert torch.equal(schedule.timestep(t), t * 1000)


def test_flow_grid_uniform_and_shifted():
    grid = NoiseSchedule.flow().grid(4)
    torch.testing.assert_close(grid, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    shifted = NoiseSchedule.flow(shift=3.0).grid(4)
    u = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64)
    torch.testing.assert_close(shifted, 3 * u / (1 + 2 * u))
    assert shifted[0] == 1.0 and shifted[-1] == 0.0 and bool((shifted[:-1] > shifted[1:]).all())


def test_diffusion_schedule_matches_diffusers_ddpm():
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    schedule = NoiseSchedule.diffusion("epsilon", 1000, "scaled_linear", 0.00085, 0.012)
    ts = torch.tensor([1, 17, 500, 999])  # timestep 0 is t = 0, which pgraft reads as clean data (below)
    a, s = schedule.alpha_sigma(ts.double() / 1000)
    abar = ref.alphas_cumprod[ts].double()
    torch.testing.assert_close(a, abar.sqrt(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(s, (1 - abar).sqrt(), atol=1e-6, rtol=1e-5)
    # t = 0 is clean data (alpha = 1), as DDIM's set_alpha_to_one
    a0, s0 = schedule.alpha_sigma(torch.tensor(0.0, dtype=torch.float64))
    assert float(a0) == 1.0 and float(s0) == 0.0


def test_diffusion_grid_is_ddim_trailing():
    from diffusers import DDIMScheduler

    ref = DDIMScheduler(num_train_timesteps=1000, timestep_spacing="trailing")
    ref.set_timesteps(10)
    grid = NoiseSchedule.diffusion().grid(10)
    assert torch.equal((grid[:-1] * 1000).round().long(), ref.timesteps.long())
    assert grid[-1] == 0.0


def test_diffusion_grid_refuses_a_step_at_timestep_zero():
    # Above 2T/3 steps the trailing grid's last timestep rounds to 0, which alpha_sigma reads as the data:
    # the last step went from t = 0 to t = 0 (a "sample"-predicting network divided by sigma = 0: NaN).
    for T in (1000, 999, 10):
        schedule = NoiseSchedule.diffusion("sample", num_train_timesteps=T)
        top = 2 * T // 3
        grid = schedule.grid(top)
        assert bool((grid[1:] < grid[:-1]).all()) and grid[-2] > 0
        for steps in (top + 1, T, T + 5):
            with pytest.raises(PgraftError, match=f"at most {top} steps"):
                schedule.grid(steps)
    schedule = NoiseSchedule.diffusion("sample")
    x = torch.randn(2, 3, dtype=torch.float64)
    out, _ = sample(lambda x, t: 0.9 * x, schedule, x, schedule.grid(666))
    assert bool(torch.isfinite(out).all())
    # the exported pipeline's own copy of the grid refuses the same, and agrees below it
    from pgraft_cli.io.export_pipeline import Schedule

    exported = Schedule({"_class_name": "DDIMScheduler", "num_train_timesteps": 1000})
    assert torch.equal(exported.grid(666), schedule.grid(666))
    with pytest.raises(ValueError, match="at most 666 steps"):
        exported.grid(667)


def test_flow_euler_is_exact_for_point_mass_data():
    """For data = delta(c) the velocity is (x - c) / t and Euler lands on c for any grid."""
    c = torch.tensor([[0.3, -0.7]])
    noise = torch.randn(5, 2, generator=torch.Generator().manual_seed(1))
    schedule = NoiseSchedule.flow()
    for steps in (1, 3, 8):
        x, captured = sample(lambda x, t: (x - c) / t, schedule, noise, schedule.grid(steps), capture_at=0.5)
        torch.testing.assert_close(x, c.expand(5, 2), atol=1e-6, rtol=0)
        x_c, t_c = captured
        assert t_c <= 0.5
        torch.testing.assert_close(x_c, c + (noise - c) * t_c, atol=1e-6, rtol=0)


def test_flow_step_is_plain_euler():
    schedule = NoiseSchedule.flow()
    x, v = torch.randn(3, 2), torch.randn(3, 2)
    t, t_next = torch.tensor(0.8, dtype=torch.float64), torch.tensor(0.55, dtype=torch.float64)
    torch.testing.assert_close(schedule.step(x, v, t, t_next), x + (t_next - t).float() * v)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_ddim_is_exact_for_point_mass_data(prediction):
    c = torch.tensor([[0.5, -0.25, 1.0]])
    schedule = NoiseSchedule.diffusion(prediction)
    noise = torch.randn(4, 3, generator=torch.Generator().manual_seed(2))

    def perfect(x, t):
        a, s = (v.float() for v in schedule.alpha_sigma(t))
        e = (x - a * c) / s
        return native_prediction(schedule, c.expand_as(x), e, float(t))

    x, _ = sample(perfect, schedule, noise, schedule.grid(6))
    torch.testing.assert_close(x, c.expand(4, 3), atol=1e-4, rtol=0)


def test_ddim_matches_diffusers_ddim_scheduler():
    """pgraft's diffusion sampler equals diffusers' DDIMScheduler (trailing, eta = 0) step for step."""
    from diffusers import DDIMScheduler

    ref = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", timestep_spacing="trailing",
                        set_alpha_to_one=True, clip_sample=False, prediction_type="epsilon")
    ref.set_timesteps(8)
    toy = lambda x, timestep: 0.3 * x + 0.001 * timestep  # noqa: E731 - any smooth "network"
    noise = torch.randn(2, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x_ref = noise.clone()
    for ts in ref.timesteps:
        x_ref = ref.step(toy(x_ref, float(ts)), ts, x_ref).prev_sample
    schedule = NoiseSchedule.diffusion("epsilon")
    x, _ = sample(lambda x, t: toy(x, float(schedule.timestep(t))), schedule, noise, schedule.grid(8))
    torch.testing.assert_close(x, x_ref, atol=1e-6, rtol=1e-6)


def test_capture_at_reports_grid_time_at_or_below_cutoff():
    schedule = NoiseSchedule.flow()
    noise = torch.zeros(1, 1)
    _, (x_c, t_c) = sample(lambda x, t: torch.ones_like(x), schedule, noise, schedule.grid(10), capture_at=0.25)
    assert t_c == pytest.approx(0.2)
    torch.testing.assert_close(x_c, torch.full((1, 1), -0.8), atol=1e-6, rtol=0)
    _, (x_1, t_1) = sample(lambda x, t: torch.ones_like(x), schedule, noise, schedule.grid(10), capture_at=0.999)
    assert t_1 == pytest.approx(0.9)


def test_invert_stops_each_image_on_its_own_residual():
    """Rows at a fixed point leave after one call; only the rest go through the network again."""
    schedule = NoiseSchedule.flow()
    seen = []

    def fn(x, t):
        seen.append(len(x))
        return torch.sin(x)  # v(0) = 0: a zero image is its own inverse

    y = torch.zeros(4, 3, dtype=torch.float64)
    y[2:] = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    z, info = invert(fn, schedule, y, schedule.grid(3), iterations=30, tol=1e-12)
    assert info.iterations[:2].tolist() == [3, 3]  # one call per step
    assert bool((info.iterations[2:] > 3).all()) and bool((info.residual < 1e-12).all())
    assert min(seen) == 2 and torch.equal(z[:2], y[:2])
    back, _ = sample(fn, schedule, z, schedule.grid(3))
    torch.testing.assert_close(back, y, atol=1e-10, rtol=0)


def test_invert_tol_last_loosens_only_the_data_step_to_its_closed_form():
    """``v = x / (2t)``: at the data's step (``h = -t_k``) ``G(x) = y + x / 2``, so plain iteration from
    ``y`` has residual ``f_j = y / 2^(j+1)``: call j sees ``y / 2^j`` and stops at the first j with
    ``RMS(y) / 2^j < tol_last``, taking ``x_j``, whose round-trip error at the data is ``-f_j``."""
    schedule, grid = NoiseSchedule.flow(), NoiseSchedule.flow().grid(4)
    y = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * torch.tensor(
        [[0.1], [0.5], [1.0], [3.0]], dtype=torch.float64)
    r = y.pow(2).mean(1).sqrt()

    def run(tol_last):
        calls: dict[float, int] = {}

        def fn(x, t):
            calls[float(t)] = calls.get(float(t), 0) + len(x)
            return x / (2 * t)

        z, _ = invert(fn, schedule, y, grid, iterations=60, tol=1e-9, memory=0, tol_last=tol_last)
        at_data = calls[float(grid[-2])]
        back, _ = sample(fn, schedule, z, grid)
        return at_data, (back - y).pow(2).mean(1).sqrt()

    exact, exact_err = run(None)
    loose, loose_err = run(1e-2)

    def j(tol):
        return torch.floor(torch.log2(r / tol)) + 1

    assert exact == int(j(1e-9).sum()) and loose == int(j(1e-2).sum()) and loose < exact - 4 * 20
    torch.testing.assert_close(loose_err, r / 2 ** (j(1e-2) + 1), rtol=1e-6, atol=1e-12)
    assert bool((loose_err < 1e-2 / 2).all()) and bool((exact_err < 1e-9).all())


def test_invert_counts_an_image_converged_only_if_every_step_met_its_own_tolerance():
    """``v = x`` above t = 0.3, else 0: the data's step is solved in one call (residual 0); each other
    step is ``G(x) = y + x / 4`` from ``y``, so 5 plain calls leave ``RMS(y) / 4^5 ~ 1e-3``: below
    ``tol_last = 1e-2`` but above ``tol = 1e-9``. That image did not converge (a zero image did)."""
    schedule, grid = NoiseSchedule.flow(), NoiseSchedule.flow().grid(4)
    y = torch.randn(3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y[0] = 0

    def fn(x, t):
        return x if float(t) > 0.3 else torch.zeros_like(x)

    _, info = invert(fn, schedule, y, grid, iterations=5, tol=1e-9, memory=0, tol_last=1e-2)
    assert bool((info.residual[1:] > 1e-9).all()) and bool((info.residual < 1e-2).all())  # the middle steps'
    assert info.converged.tolist() == [True, False, False]
    _, enough = invert(fn, schedule, y, grid, iterations=40, tol=1e-9, memory=0, tol_last=1e-2)
    assert enough.converged.tolist() == [True, True, True]


def test_invert_with_a_tighter_last_tolerance_counts_a_missed_last_step_as_not_converged():
    """``v = x / (2t)``: the data's step is ``G(x) = y + x / 2`` (4 calls leave ``RMS(y) / 32``, here
    ~3e-4: above ``tol_last = 1e-4``, below ``tol = 1e-2``); the other steps contract by 1/4 or more."""
    schedule, grid = NoiseSchedule.flow(), NoiseSchedule.flow().grid(4)
    y = 0.01 * torch.randn(2, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def fn(x, t):
        return x / (2 * t)

    _, info = invert(fn, schedule, y, grid, iterations=4, tol=1e-2, memory=0, tol_last=1e-4)
    assert bool((info.residual > 1e-4).all()) and bool((info.residual < 1e-2).all())
    assert info.converged.tolist() == [False, False]
    _, enough = invert(fn, schedule, y, grid, iterations=40, tol=1e-2, memory=0, tol_last=1e-4)
    assert enough.converged.tolist() == [True, True] and bool((enough.residual < 1e-2).all())


def test_invert_ddim_flags_each_image_against_its_steps_own_tolerance():
    """The DDIM path carries the same flag (Gaussian data, plain iteration): 6 calls a step leave the
    noisier steps above ``tol = 1e-4`` and every residual below ``tol_last = 0.2``: not converged; 20
    calls reach ``tol`` but never a data step's ``tol_last = 1e-300``: not converged either."""
    schedule = NoiseSchedule.diffusion("epsilon")
    grid = schedule.grid(6)
    x0 = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 0.5
    fn = gaussian_data_denoiser(schedule, 0.5)
    _, few = invert_sampler(fn, schedule, x0, grid, 6, 1e-4, memory=0, tol_last=0.2)
    assert bool((few.residual > 1e-4).all()) and bool((few.residual < 0.2).all())
    assert few.converged.tolist() == [False] * 3
    for tol_last, converged in ((0.2, True), (None, True), (1e-300, False)):
        _, info = invert_sampler(fn, schedule, x0, grid, 20, 1e-4, memory=0, tol_last=tol_last)
        assert info.converged.tolist() == [converged] * 3, tol_last


@pytest.mark.parametrize("schedule", [NoiseSchedule.flow(), NoiseSchedule.diffusion("epsilon"),
                                      NoiseSchedule.diffusion(beta_schedule="squaredcos_cap_v2")])
def test_the_kernel_from_c_composes_with_the_marginal_at_c_into_the_marginal_at_t(schedule):
    """x_c = alpha_c x0 + sigma_c e' and x_t = a x_c + sqrt(s2) e give x_t = alpha_t x0 + sigma_t e'':
    ``a alpha_c = alpha_t`` and ``a^2 sigma_c^2 + s2 = sigma_t^2``, with ``s2 = 0`` at ``t = c``."""
    c = torch.tensor([0.1, 0.3, 0.5, 0.7], dtype=torch.float64)
    t = c + (1 - c) * torch.tensor([0.9, 0.5, 0.2, 0.0], dtype=torch.float64)
    a, s2 = schedule.kernel(t, c)
    (alpha_c, sigma_c), (alpha_t, sigma_t) = schedule.alpha_sigma(c), schedule.alpha_sigma(t)
    torch.testing.assert_close(a * alpha_c, alpha_t, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a**2 * sigma_c**2 + s2, sigma_t**2, rtol=1e-12, atol=1e-12)
    assert abs(float(s2[-1])) < 1e-12 and bool((s2[:-1] > 0).all())


def gaussian_data_denoiser(schedule: NoiseSchedule, c: float):
    """The exact denoiser of data ``N(0, c^2 I)`` in the schedule's prediction type: linear in x,
    ``x0_hat = a c^2 x / (a^2 c^2 + s^2)``, ``e_hat = s x / (a^2 c^2 + s^2)``."""
    def denoiser(x, t):
        a, s = (v.to(x.dtype) for v in schedule.alpha_sigma(t))
        d = a * a * c * c + s * s
        return schedule.from_x0_eps(x, a * c * c * x / d, s * x / d, t)
    return denoiser


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear"])
def test_invert_ddim_matches_the_exact_inverse_of_a_linear_ddim(prediction, beta_schedule):
    """For Gaussian data every DDIM step is ``x' = k x`` with ``k = a' + (s' - a' s / a) e_hat/x`` ...
    so the exact inverse is ``x0 / prod k``; invert_ddim must find it."""
    schedule = NoiseSchedule.diffusion(prediction, beta_schedule=beta_schedule,
                                       beta_start=1e-4 if beta_schedule == "linear" else 8.5e-4,
                                       beta_end=0.02 if beta_schedule == "linear" else 0.012)
    c = 0.5
    grid = schedule.grid(10)
    exact = torch.ones((), dtype=torch.float64)
    for t, t_next in zip(grid[:-1], grid[1:]):
        a, s = schedule.alpha_sigma(t)
        a2, s2 = schedule.alpha_sigma(t_next)
        d = a * a * c * c + s * s
        exact = exact * (a2 * a * c * c / d + s2 * s / d)
    x0 = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * c
    noise, info = invert_ddim(gaussian_data_denoiser(schedule, c), schedule, x0, grid, iterations=30, tol=1e-10)
    torch.testing.assert_close(noise, x0 / exact, rtol=1e-7, atol=1e-9)
    assert bool((info.residual < 1e-10).all())
    # and the same inverse through the family dispatch
    torch.testing.assert_close(invert_sampler(gaussian_data_denoiser(schedule, c), schedule, x0, grid, 30, 1e-10)[0],
                               noise)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_invert_ddim_then_sample_round_trips_a_nonlinear_denoiser(prediction):
    """Data from two Gaussians ``N(+-m, v)`` per pixel: the exact denoiser (nonlinear) is
    ``x0_hat = mu + a v (x - a mu) / d`` with ``d = a^2 v + s^2`` and ``mu = m tanh(a m x / d)``;
    sampling the inverted noise must give the image back (float32 network, round trip 1e-5)."""
    schedule = NoiseSchedule.diffusion(prediction)
    m, v = 0.8, 0.05

    def denoiser(x, t):
        a, s = (c.to(x.dtype) for c in schedule.alpha_sigma(t))
        d = a * a * v + s * s
        mu = m * torch.tanh(a * m * x / d)
        x0_hat = mu + a * v * (x - a * mu) / d
        return schedule.from_x0_eps(x, x0_hat, (x - a * x0_hat) / s, t).float()

    grid = schedule.grid(8)
    x0 = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(2)) * v**0.5 + m
    x0[:, :, :2] -= 2 * m
    noise, info = invert_ddim(denoiser, schedule, x0, grid, iterations=40, tol=1e-6)
    assert noise.dtype == torch.float32 and bool((info.residual < 1e-6).all())
    back, _ = sample(lambda x, t: denoiser(x.double(), t), schedule, noise.double(), grid)
    assert float((back - x0.double()).pow(2).mean().sqrt()) < 1e-5
    assert 0.5 < float(noise.std()) < 2  # noise-sized, not the image


def test_invert_tells_a_row_indexed_denoiser_which_rows_it_is_given():
    """Per-image conditioning follows the rows still iterating: ``v = a_i x`` with ``a_0 = 0`` (that
    image leaves after one call) inverts to the closed form ``y_i / (1 - 0.2 a_i)^5`` of each row."""
    schedule = NoiseSchedule.flow()
    a = torch.tensor([0.0, 0.3, 0.6], dtype=torch.float64)
    seen = []

    def fn(x, t, rows):
        seen.append(rows.tolist())
        return a[rows].view(-1, 1) * x

    y = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    z, info = invert(fn, schedule, y, schedule.grid(5), iterations=60, tol=1e-14, row_indexed=True)
    torch.testing.assert_close(z, y / (1 - 0.2 * a.view(-1, 1)) ** 5, atol=1e-10, rtol=0)
    assert [1, 2] in seen and bool((info.residual < 1e-14).all())


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_invert_ddim_tells_a_row_indexed_denoiser_which_rows_it_is_given(prediction):
    """Each row's data is N(0, c_i^2): the row-indexed inverse equals inverting each row on its own."""
    schedule = NoiseSchedule.diffusion(prediction)
    cs = [0.3, 0.5, 0.9]
    grid = schedule.grid(6)

    def fn(x, t, rows):
        return torch.cat([gaussian_data_denoiser(schedule, cs[int(r)])(x[i:i + 1], t) for i, r in enumerate(rows)])

    x0 = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 0.5
    noise, _ = invert_sampler(fn, schedule, x0, grid, 30, 1e-10, row_indexed=True)
    for i, c in enumerate(cs):
        alone, _ = invert_ddim(gaussian_data_denoiser(schedule, c), schedule, x0[i:i + 1], grid, iterations=30, tol=1e-10)
        torch.testing.assert_close(noise[i:i + 1], alone, rtol=1e-7, atol=1e-9)


def test_heun_is_exact_for_a_field_affine_in_t_where_euler_is_not():
    """dx/dt = a + b t from x(1) = x1: x(0) = x1 - a - b / 2 (the trapezoid rule is exact); Euler on
    4 steps misses by b / 8 (its left sums, times -1, of b t over [0, 1] with h = 1/4)."""
    a, b, x1 = torch.tensor([0.3, -1.0], dtype=torch.float64), 2.0, torch.tensor([1.5, 0.25], dtype=torch.float64)
    grid = NoiseSchedule.flow().grid(4).to(torch.float64)
    field = lambda x, t: (a + b * t).to(x.dtype).expand_as(x)  # noqa: E731
    torch.testing.assert_close(sample_heun(field, x1, grid), x1 - a - b / 2, atol=1e-12, rtol=0)
    euler, _ = sample(field, NoiseSchedule.flow(), x1, grid)
    torch.testing.assert_close(euler, x1 - a - b / 2 - b / 8, atol=1e-12, rtol=0)


def test_heun_is_second_order():
    """dx/dt = x from x(1) = 1 to t = 0: x(0) = e^-1; halving the step cuts Heun's error by about 4."""
    errors = [float((sample_heun(lambda x, t: x, torch.ones(1, dtype=torch.float64),
                                 NoiseSchedule.flow().grid(n)) - torch.exp(torch.tensor(-1.0))).abs())
              for n in (8, 16)]
    assert 3.6 < errors[0] / errors[1] < 4.4
