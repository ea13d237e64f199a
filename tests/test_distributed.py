"""torch.distributed data parallelism: 2 gloo ranks on CPU give the scores of 1 process."""

from __future__ import annotations

import os
import socket

import numpy as np
import torch
import torch.multiprocessing as mp

from layercap.data.calibration import CalibrationSet
from layercap.models.tiny import build_tiny
from layercap.scores import ScoreOptions, score_model

# case -> score method; "kfac-streamed" streams one block per statistics pass (--max-factor-gb)
CASES = {"gradnorm": "gradnorm", "diag": "diag", "kfac": "kfac", "kfac-streamed": "kfac", "exact": "exact"}


def _calib() -> CalibrationSet:
    ids = torch.randint(0, 320, (5, 7), generator=torch.Generator().manual_seed(4))  # odd: uneven shards
    return CalibrationSet(ids, "dist", "random", 0)


def _options(case: str) -> ScoreOptions:
    return ScoreOptions(batch_size=2, fisher="true" if case == "diag" else "empirical", cg_max_iter=5,
                        max_factor_gb=1e-9 if case == "kfac-streamed" else None)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, _ = build_tiny("llama", num_layers=2, hidden=8, seed=5)
        for case, method in CASES.items():
            scores = score_model(model, method, _calib(), options=_options(case))
            np.save(os.path.join(out_dir, f"{case}.rank{rank}.npy"), scores.zeta2)
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_match_one_process(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    model, _ = build_tiny("llama", num_layers=2, hidden=8, seed=5)
    for case, method in CASES.items():
        single = score_model(model, method, _calib(), options=_options(case)).zeta2
        r0 = np.load(tmp_path / f"{case}.rank0.npy")
        r1 = np.load(tmp_path / f"{case}.rank1.npy")
        np.testing.assert_array_equal(r0, r1)  # every rank ends with the same answer
        np.testing.assert_allclose(r0, single, rtol=1e-5 if method != "exact" else 1e-4, err_msg=case)
    np.testing.assert_allclose(np.load(tmp_path / "kfac-streamed.rank0.npy"), np.load(tmp_path / "kfac.rank0.npy"), rtol=1e-6)
