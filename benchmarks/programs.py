"""Benchmark: layercap's exact dual-search programs vs cvxpy (CLARABEL) on the same instances.

    .venv/bin/python benchmarks/programs.py                       # K = 32, 1024, 100000
    .venv/bin/python benchmarks/programs.py --sizes 32,1024 --cvxpy-timeout 60 --json out.json

Programs (one random instance per K, seed 0):
  allocation  continuous water-filling, random costs in [0.5, 2], lower bound 1, alpha auto,
              budget 5 x sum(costs)                      vs cvxpy: max sum q^beta log(1+n)
  integer     integer experts, equal costs, at least 1, budget 5K (greedy threshold search)
              vs cvxpy: the continuous relaxation (cvxpy cannot solve the integer program with
              log terms at all; the relaxation is the cheapest thing it can do)
  prune-exact pruning ratios, equality sparsity 0.5, p = 2, eta = 1, N_k in [1e3, 1e5)
  prune-atleast the paper's literal program, gamma = 1 and b at half the value where the
              constraint stops binding (with b = 16 it is degenerate: nothing to solve)

Times: ours = median (and minimum) wall time of repeated calls, and the median process CPU
time; cvxpy = wall time of
problem construction + solve in a child process, capped at --cvxpy-timeout seconds (a capped
run is reported as "> cap" and its speed-up as a lower bound). The machine is shared: the load
average is printed with the results.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import time

import numpy as np


def instance(K: int, seed: int = 0):
    rng = np.random.default_rng([seed, K])
    z = rng.random(K) ** 2 + 0.01
    costs = rng.uniform(0.5, 2.0, K)
    N = rng.integers(1_000, 100_000, K).astype(np.float64)
    return z, costs, N


def atleast_bits(K: int) -> float:
    """Bits per weight at half the value where the at-least constraint stops binding (nu_exact + b).

    With raw parameter counts and b = 16 the literal program is degenerate (every layer at
    rho_max, nothing to solve); this b makes it bind, so the benchmark times a real solve.
    """
    from layercap.programs.pruning import pruning_ratios

    z, _, N = instance(K)
    nu = pruning_ratios(z, N, 0.5, mode="exact", bits=16.0).nu
    return 0.5 * (nu + 16.0)


def ours(program: str, K: int):
    """Returns a zero-argument callable solving the program, and a function giving its objective."""
    from layercap.programs.allocation import water_fill
    from layercap.programs.integer import allocate_integer
    from layercap.programs.pruning import pruning_ratios

    z, costs, N = instance(K)
    q = z / z.sum()
    if program == "allocation":
        B = 5.0 * costs.sum()
        run = lambda: water_fill(z, B, costs=costs, beta=0.9, alpha="auto", lower=1.0)  # noqa: E731
        value = lambda sol: float((q ** 0.9) @ np.log1p(sol.n))  # noqa: E731
    elif program == "integer":
        run = lambda: allocate_integer(z, 5 * K, beta=0.9, lower=1)  # noqa: E731
        value = lambda sol: float((q ** 0.9) @ np.log1p(sol.n))  # noqa: E731
    elif program == "prune-exact":
        run = lambda: pruning_ratios(z, N, 0.5, mode="exact")  # noqa: E731
        value = lambda sol: float(q @ sol.rho ** 2)  # noqa: E731
    elif program == "prune-atleast":
        b = atleast_bits(K)
        run = lambda: pruning_ratios(z, N, 0.5, mode="at-least", bits=b, gamma=1.0)  # noqa: E731
        value = lambda sol: float(b * N @ (1 - sol.rho) + q @ sol.rho ** 2)  # noqa: E731
    else:
        raise ValueError(program)
    return run, value


def cvxpy_solve(program: str, K: int, queue) -> None:
    import cvxpy as cp

    z, costs, N = instance(K)
    q = z / z.sum()
    t0 = time.perf_counter()
    if program in ("allocation", "integer"):
        c = costs if program == "allocation" else np.ones(K)
        B = 5.0 * costs.sum() if program == "allocation" else 5.0 * K
        n = cp.Variable(K)
        w = q ** 0.9
        prob = cp.Problem(cp.Maximize(cp.sum(cp.multiply(w, cp.log1p(n)))), [c @ n <= B, n >= 1])
        prob.solve(solver="CLARABEL")
        val = float(w @ np.log1p(np.maximum(n.value, 1.0)))
    else:
        rho = cp.Variable(K)
        cons = [rho >= 0, rho <= 1]
        if program == "prune-exact":
            cons.append(N @ rho == 0.5 * N.sum())
            prob = cp.Problem(cp.Minimize(cp.sum(cp.multiply(q, cp.square(rho)))), cons)
        else:
            b = atleast_bits(K)
            cons.append(N @ rho >= 0.5 * N.sum())
            prob = cp.Problem(cp.Minimize(b * N @ (1 - rho) + cp.sum(cp.multiply(q, cp.square(rho)))), cons)
        prob.solve(solver="CLARABEL")
        x = np.clip(rho.value, 0, 1)
        val = float(q @ x ** 2) if program == "prune-exact" else float(b * N @ (1 - x) + q @ x ** 2)
    queue.put({"wall_s": time.perf_counter() - t0, "solver_s": prob.solver_stats.solve_time, "status": prob.status, "value": val})


def time_cvxpy(program: str, K: int, cap: float) -> dict:
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=cvxpy_solve, args=(program, K, queue))
    t0 = time.perf_counter()
    proc.start()
    proc.join(cap)
    if proc.is_alive():
        proc.terminate()
        proc.join()
        return {"wall_s": None, "capped_at_s": cap, "reason": f"cvxpy did not finish within {cap:g} s"}
    if queue.empty():
        return {"wall_s": None, "reason": f"cvxpy failed (exit code {proc.exitcode}) after {time.perf_counter() - t0:.1f} s"}
    return queue.get()


def time_ours(program: str, K: int) -> dict:
    run, value = ours(program, K)
    sol = run()  # warm-up (imports, first-touch allocations)
    repeats = 50 if K <= 10_000 else 15
    walls, cpus = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        sol = run()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return {"wall_s": float(np.median(walls)), "cpu_s": float(np.median(cpus)), "min_wall_s": float(np.min(walls)),
            "value": value(sol), "repeats": repeats}


def machine() -> dict:
    model = platform.processor() or "?"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="32,1024,100000", help="comma-separated K (default 32,1024,100000)")
    ap.add_argument("--programs", default="allocation,integer,prune-exact,prune-atleast")
    ap.add_argument("--cvxpy-timeout", type=float, default=300.0, help="cap on one cvxpy build+solve, seconds (default 300)")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    programs = args.programs.split(",")
    info = machine()
    info["load_before"] = os.getloadavg()
    rows = []
    for K in sizes:
        for prog in programs:
            o = time_ours(prog, K)
            c = time_cvxpy(prog, K, args.cvxpy_timeout)
            row = {"program": prog, "K": K, "ours": o, "cvxpy": c}
            if c.get("wall_s"):
                row["speedup"] = c["wall_s"] / o["wall_s"]
                # relative objective difference (positive: ours better; cvxpy's value is at its
                # own, slightly inexact, solution)
                better = 1 if prog in ("allocation", "integer") else -1
                row["rel_diff"] = better * (o["value"] - c["value"]) / max(abs(c["value"]), 1e-300)
            elif c.get("capped_at_s"):
                row["speedup_lower_bound"] = c["capped_at_s"] / o["wall_s"]
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    info["load_after"] = os.getloadavg()
    print(f"Machine: {info['cpu']}, {info['cores']} cores (shared), Python {info['python']}, numpy {info['numpy']}; "
          f"load average before {info['load_before'][0]:.1f}, after {info['load_after'][0]:.1f}.\n")
    print("| program | K | layercap wall, median / min (ms) | layercap CPU (ms) | cvxpy build+solve (s) | speed-up (median) | objective vs cvxpy |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        o, c = r["ours"], r["cvxpy"]
        if c.get("wall_s"):
            cv, sp = f"{c['wall_s']:.3f}", f"{r['speedup']:,.0f}x"
            if r["program"] == "integer":
                note = f"relaxation (upper bound) exceeds our integer value by {-r['rel_diff']:.1e} rel."
            else:
                note = f"{r['rel_diff']:+.1e} rel. ({'ours better' if r['rel_diff'] > 0 else 'cvxpy better'})" if r["rel_diff"] else "equal"
        elif c.get("capped_at_s"):
            cv, sp, note = f"> {c['capped_at_s']:g} (capped)", f"> {r['speedup_lower_bound']:,.0f}x", c["reason"]
        else:
            cv, sp, note = "-", "-", c.get("reason", "")
        print(f"| {r['program']} | {r['K']:,} | {o['wall_s'] * 1e3:.2f} / {o['min_wall_s'] * 1e3:.2f} | {o['cpu_s'] * 1e3:.2f} | {cv} | {sp} | {note} |")
    if args.json:
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
        from layercap.io import atomic_write_json

        atomic_write_json(args.json, {"machine": info, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
