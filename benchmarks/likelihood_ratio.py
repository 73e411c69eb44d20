r"""ULR vs backprop (time, peak memory) and ULR vs ES vs evosax (cosine per forward evaluation).

  PYTHONPATH=. python benchmarks/likelihood_ratio.py [--depths 4,8,16] [--width 256] [--rng]

Part 1, side by side in one process, on deep ReLU MLPs at equal batch:
CPU time of one gradient (``time.process_time``, all threads: the median of
``--repeats`` runs after compilation; ``--rounds`` such medians taken in
turn for every method, so that load on a shared machine hits all alike),
its ratio to backprop (median over rounds, and the rounds' range), and peak
memory as XLA reports it for the compiled gradient function
(``compiled.memory_analysis().temp_size_in_bytes``: the scratch buffers the
program needs, activations included; parameters and outputs excluded).
Baseline: ``jax.value_and_grad``. ULR one-pass and ULR ``recompute=True``.

Part 3 (``--rng``): compile and run CPU time of the whole ULR
estimator with its noise drawn by each `jax.random` implementation:
threefry2x32 (the library's), rbg and unsafe_rbg (XLA RngBitGenerator).

Part 2: mean cosine to the exact gradient per forward evaluation on an
8-layer MLP: ULR (leave-one-out mean baseline; layer-wise + clean baseline with N-1
copies, so N forward evaluations in all), ES (antithetic weight perturbation, this
module) and evosax's OpenES (identity fitness shaping, if importable).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import wspace as ws
from wspace import likelihood_ratio as lr
from wspace.likelihood_ratio import _ulr


def _mlp(depth, width):
    return ws.models.MLP(features=(width,) * (depth - 1), num_classes=10)


def _setup(depth, width, batch, dim=64, seed=0):
    model = _mlp(depth, width)
    key = jax.random.PRNGKey(seed)
    x = jax.random.normal(key, (batch, dim))
    y = jnp.arange(batch) % 10
    params = model.init(key, x)["params"]
    return model, params, {"x": x, "y": y}


def _temp_bytes(compiled) -> float:
    mem = compiled.memory_analysis()
    return getattr(mem, "temp_size_in_bytes", float("nan")) if mem is not None else float("nan")


def _median_run(compiled, args, repeats) -> float:
    """Median CPU seconds (`time.process_time`) of ``compiled(*args)`` over ``repeats`` runs."""
    jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(repeats):
        t = time.process_time()
        jax.block_until_ready(compiled(*args))
        times.append(time.process_time() - t)
    return statistics.median(times)


def part1(depths, width, batch, copies, repeats, rounds):
    print(f"\n== one gradient, MLP width {width}, batch {batch}, ULR N={copies} (antithetic) ==")
    print(
        f"{'depth':>5} {'method':>16} {'cpu ms':>9} {'temp MiB':>9} {'time/bp':>8} "
        f"{'(rounds range)':>15} {'mem/bp':>7}"
    )
    rows = []
    for depth in depths:
        model, params, batch_ = _setup(depth, width, batch)
        mean_loss = ws.training.classification_loss(model.apply)
        per_ex = ws.training.classification_loss(model.apply, per_example=True)
        key = jax.random.PRNGKey(1)
        estimators = {
            "backprop": jax.value_and_grad(mean_loss, has_aux=True),
            "ulr": lr.ulr(num_copies=copies, antithetic=True)(per_ex),
            "ulr recompute": lr.ulr(num_copies=copies, antithetic=True, recompute=True)(per_ex),
        }
        args = (params, batch_, key)
        compiled = {
            name: jax.jit(lambda p, b, k, f=f: f(p, {}, b, k)[1]).lower(*args).compile()
            for name, f in estimators.items()
        }
        times: dict[str, list[float]] = {name: [] for name in compiled}
        for _ in range(rounds):
            for name, c in compiled.items():
                times[name].append(_median_run(c, args, repeats))
        for name, c in compiled.items():
            t, m = statistics.median(times[name]), _temp_bytes(c)
            ratios = [a / b for a, b in zip(times[name], times["backprop"], strict=True)]
            rows.append((depth, name, t, m, statistics.median(ratios)))
            spread = f"[{min(ratios):.2f}, {max(ratios):.2f}]"
            print(
                f"{depth:>5} {name:>16} {1e3 * t:>9.2f} {m / 2**20:>9.2f} "
                f"{statistics.median(ratios):>8.2f} {spread:>15} "
                f"{m / _temp_bytes(compiled['backprop']):>7.2f}"
            )
    return rows


def _evosax_grad_fn(loss, params, pop):
    try:
        from evosax.algorithms import Open_ES
        from evosax.core.fitness_shaping import identity_fitness_shaping_fn
    except ImportError:
        return None
    from jax.flatten_util import ravel_pytree

    flat, unravel = ravel_pytree(params)
    strategy = Open_ES(
        population_size=pop,
        solution=flat,
        optimizer=optax.sgd(1.0),
        std_schedule=optax.constant_schedule(0.01),
        fitness_shaping_fn=identity_fitness_shaping_fn,
    )
    es_params = strategy.default_params

    def grad(key):
        state = strategy.init(key, flat, es_params)
        k1, k2 = jax.random.split(key)
        population, state = strategy.ask(k1, state, es_params)
        fitness = jax.vmap(lambda f: loss(unravel(f)))(population)
        new = strategy.tell(k2, population, fitness, state, es_params)[0]
        return state.mean - new.mean  # sgd(1): the update is minus the gradient estimate

    return grad


def part2(depth, width, batch, copies_list, repeats):
    print(f"\n== cosine to exact gradient, {depth}-layer MLP width {width}, batch {batch} ==")
    model, params, batch_ = _setup(depth, width, batch)
    mean_loss = ws.training.classification_loss(model.apply)
    per_ex = ws.training.classification_loss(model.apply, per_example=True)
    flat = lambda t: jnp.concatenate([a.ravel() for a in jax.tree.leaves(t)])
    exact = flat(jax.grad(lambda p: mean_loss(p, {}, batch_, None)[0])(params))
    print(f"params: {exact.size}")
    print(f"{'N':>5} {'method':>22} {'cosine':>8} {'cos/ES':>7}")
    rows = []
    for n in copies_list:
        fns = {
            "ulr (mean baseline)": lambda k, n=n: flat(
                lr.ulr(num_copies=n, sigma=0.1, baseline="mean")(per_ex)(params, {}, batch_, k)[1]
            ),
            "ulr (layerwise+clean)": lambda k, n=n: flat(
                lr.ulr(num_copies=n - 1, sigma=0.1, layerwise=True, baseline="clean")(per_ex)(
                    params, {}, batch_, k
                )[1]
            ),
            "es (antithetic)": lambda k, n=n: flat(
                lr.es(num_copies=n, sigma=0.01)(mean_loss)(params, {}, batch_, k)[1]
            ),
        }
        evosax = _evosax_grad_fn(lambda p: mean_loss(p, {}, batch_, None)[0], params, n)
        if evosax is not None:
            fns["evosax OpenES"] = evosax
        cos = {}
        for name, fn in fns.items():
            f = jax.jit(fn)
            vals = []
            for r in range(repeats):
                g = f(jax.random.PRNGKey(100 + r))
                vals.append(float(g @ exact / jnp.linalg.norm(g) / jnp.linalg.norm(exact)))
            cos[name] = statistics.mean(vals)
        for name, c in cos.items():
            print(f"{n:>5} {name:>22} {c:>8.4f} {c / cos['es (antithetic)']:>7.1f}")
            rows.append((n, name, c))
        if evosax is None:
            print("      evosax not importable: OpenES row skipped")
    return rows


def part3_rng(depths, width, batch, copies, repeats):
    """Whole-estimator compile and run time per noise RNG implementation."""
    print(f"\n== noise RNG: ULR N={copies} (antithetic), MLP width {width}, batch {batch} ==")
    print(f"{'depth':>5} {'impl':>11} {'mode':>9} {'compile cpu-s':>13} {'run cpu-ms':>10}")
    threefry_key = _ulr._noise_key

    def impl_key(impl):
        if impl == "threefry2x32":
            return threefry_key
        return lambda key: jax.random.wrap_key_data(
            jnp.tile(jax.random.key_data(threefry_key(key)), 2), impl=impl
        )

    rows = []
    try:
        for depth in depths:
            model, params, batch_ = _setup(depth, width, batch)
            per_ex = ws.training.classification_loss(model.apply, per_example=True)
            for recompute in (False, True):
                for impl in ("threefry2x32", "rbg", "unsafe_rbg"):
                    _ulr._noise_key = impl_key(impl)
                    est = lr.ulr(num_copies=copies, antithetic=True, recompute=recompute)(per_ex)
                    fn = jax.jit(lambda p, b, k, est=est: est(p, {}, b, k)[1])
                    args = (params, batch_, jax.random.PRNGKey(1))
                    t0 = time.process_time()
                    compiled = fn.lower(*args).compile()
                    tc = time.process_time() - t0
                    mode = "recompute" if recompute else "one-pass"
                    t_run = 1e3 * _median_run(compiled, args, repeats)
                    print(f"{depth:>5} {impl:>11} {mode:>9} {tc:>13.2f} {t_run:>10.2f}")
                    rows.append((depth, impl, mode, tc, t_run))
    finally:
        _ulr._noise_key = threefry_key
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", default="4,8,16")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--copies", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5, help="part 1: interleaved rounds")
    parser.add_argument("--rng", action="store_true", help="only part 3 (noise RNG timings)")
    args = parser.parse_args()
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}")
    if args.rng:
        depths = [int(d) for d in args.depths.split(",")]
        part3_rng(depths, args.width, args.batch, args.copies, args.repeats)
        return
    depths = [int(d) for d in args.depths.split(",")]
    part1(depths, args.width, args.batch, args.copies, args.repeats, args.rounds)
    part2(8, args.width, args.batch, [16, 64], max(args.repeats // 2, 3))


if __name__ == "__main__":
    main()
