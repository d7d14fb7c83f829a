"""Which GPU a process takes, which backend its process group uses, where FSDP puts the
shards, whose GPU generator a resume restores, and what pre-flight checks for a cluster:
the logic of the CUDA paths, run on the CPU with the machine's answers given
(docs/distributed.md)."""

from __future__ import annotations

import pytest
import torch
from helpers import TINY, config

from trainrun import devices, distributed, state
from trainrun.errors import ConfigError

TORCHRUN = {"WORLD_SIZE": "8", "RANK": "5", "LOCAL_RANK": "1"}
SRUN = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "6", "SLURM_NTASKS": "8", "SLURM_LOCALID": "2",
        "SLURM_JOB_ID": "7"}


@pytest.fixture
def gpus(monkeypatch):
    """A machine that shows this many CUDA GPUs (torch's answers only: nothing runs there)."""
    def show(count: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    return show


@pytest.mark.parametrize("env, job, expected", [
    (TORCHRUN, None, 1), (SRUN, None, 2), (SRUN, 5, 2),  # a distributed launch: the local rank
    ({}, 3, 3), ({}, None, 0),  # a sweep's job: its number; else the first
])
def test_the_slot_is_the_local_rank_else_the_sweep_job(env, job, expected):
    assert devices.slot(job, env) == expected


@pytest.mark.parametrize("count, slot, expected", [(8, 2, 2), (4, 6, 2), (1, 5, 0)])
def test_a_process_takes_the_gpu_of_its_slot_among_those_it_sees(gpus, count, slot, expected):
    gpus(count)  # one GPU shown per task (count 1), as some clusters do, gives cuda:0
    assert devices.resolve("auto", slot) == torch.device("cuda", expected)
    assert devices.resolve("cuda", slot) == torch.device("cuda", expected)
    assert devices.resolve("cpu", slot) == torch.device("cpu")


def test_every_srun_task_of_a_sweep_job_gets_its_own_gpu(gpus, monkeypatch):
    """A job of the SLURM preset: its tasks are ranks before the process group exists, and
    each takes the GPU of its local rank, not the first."""
    gpus(4)
    cfg = config(*TINY, "trainer.device=auto")
    from trainrun.runner import device_and_precision

    taken = set()
    for local in range(4):
        monkeypatch.setattr("os.environ", {**SRUN, "SLURM_LOCALID": str(local),
                                           "SLURM_PROCID": str(local)})
        taken.add(device_and_precision(cfg)[0])
    assert taken == {torch.device("cuda", i) for i in range(4)}


@pytest.mark.parametrize("local", range(4))
def test_a_sweep_job_of_the_slurm_preset_joins_on_the_gpu_of_its_local_rank(gpus, monkeypatch,
                                                                             tmp_path, local):
    """runner.run_training resolves the device before it joins the process group: under the
    SLURM preset a sweep job's tasks (srun's, 4 GPUs a node) are ranks already, so each
    sets and joins on the GPU of its local rank, whatever the job's number."""
    from trainrun import runner

    gpus(4)
    cfg = config(*TINY, "trainer.device=auto")
    monkeypatch.setattr("os.environ", {**SRUN, "SLURM_NTASKS": "4", "SLURM_LOCALID": str(local),
                                       "SLURM_PROCID": str(local)})
    asked = []

    def group(backend, **kwargs):
        asked.append(backend)
        raise RuntimeError("stop here")  # the group itself is not made
    monkeypatch.setattr(distributed.dist, "init_process_group", group)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: asked.append(f"set_device {d}"))
    with pytest.raises(RuntimeError, match="stop here"):
        runner.run_training(cfg, tmp_path / "run", "", {}, runner.Launch(job=1))
    assert asked == [f"set_device cuda:{local}", "cuda:nccl,cpu:gloo"]
    assert not (tmp_path / "run").exists()


def test_cuda_asked_where_a_launcher_hid_every_gpu_is_one_line(gpus, monkeypatch):
    gpus(0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ConfigError) as refused:
        devices.resolve("cuda")
    assert "(CUDA_VISIBLE_DEVICES is empty)" in str(refused.value)


def test_the_backend_follows_the_runs_device_not_cudas_presence(gpus, monkeypatch):
    """trainer.device=cpu under torchrun on a machine with fewer GPUs than processes: gloo,
    and no GPU is touched."""
    gpus(1)
    for name, value in TORCHRUN.items():
        monkeypatch.setenv(name, value)
    asked = []

    def group(backend, **kwargs):
        asked.append(backend)
        raise RuntimeError("stop here")  # the group itself is not made
    monkeypatch.setattr(distributed.dist, "init_process_group", group)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: asked.append(f"set_device {d}"))
    with pytest.raises(RuntimeError, match="stop here"):
        distributed.init(torch.device("cpu"))
    assert asked == ["gloo"]
    assert devices.backend(torch.device("cuda", 0)) == "cuda:nccl,cpu:gloo"


def test_fsdp_shards_on_the_runs_device_whatever_the_accelerator(monkeypatch):
    """Without a mesh of its own, fully_shard builds one on the machine's accelerator, and
    a CPU run's parameters would go to the GPU."""
    from trainrun.data.tokenizers import ByteTokenizer
    from trainrun.models import GPT

    cfg = config(*TINY)
    world = distributed.init_single(torch.device("cpu"))
    try:
        monkeypatch.setattr(torch._C, "_get_accelerator", lambda *a: torch.device("cuda"))
        model = GPT(cfg.model, ByteTokenizer.vocab_size)
        distributed.Replicas(model, "fsdp", world, torch.device("cpu"))
        meshes = {p.device_mesh.device_type for p in model.parameters()}
        assert meshes == {"cpu"} and {p.device.type for p in model.parameters()} == {"cpu"}
    finally:
        distributed.close()


@pytest.mark.parametrize("saved, rank, expected", [
    (["r0", "r1", "r2", "r3"], 2, "r2"),  # each rank its own GPU's generator
    (["r0", "r1"], 3, "r1"),  # more ranks than wrote it: rank mod their number
    (["r0"], 0, "r0"), ([], 1, None),  # a CPU run saved none
])
def test_a_rank_restores_its_own_gpus_generator(saved, rank, expected):
    assert state.own(saved, rank) == expected


def test_a_cpu_run_saves_no_gpu_generator():
    saved = state.rng_state(torch.device("cpu"))
    assert saved["cuda"] == []
    state.set_rng_state(saved, torch.device("cpu"))  # and restores without one


def test_pre_flight_leaves_a_clusters_device_and_memory_to_its_jobs():
    """From a login node without a GPU: the SLURM preset's jobs ask for cuda and a model
    larger than this host's memory, and pre-flight checks only what it can check here."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from trainrun.composition import preflight

    big = ["model.d_model=8192", "model.n_layers=96", "model.n_heads=64", "model.d_ff=32768"]
    remote = ["-m", "hydra/launcher=slurm", "trainer.device=cuda", *big]
    configs = preflight(remote)
    assert [c.trainer.device for c in configs] == ["cuda"]
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="trainer.device"):  # run here: refused here
            preflight(["-m", "trainer.device=cuda", *big])
    with pytest.raises(ConfigError, match="model.d_model"):  # still validated: bad values
        preflight([*remote, "model.d_model=-1"])


def test_the_local_submitit_preset_shows_its_jobs_every_gpu(gpus):
    """It used to ask submitit for 0 GPUs, which sets CUDA_VISIBLE_DEVICES="" for each job:
    they trained on the CPU without a word."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from trainrun.composition import hydra_configs

    gpus(4)
    (cfg,) = hydra_configs([["hydra/launcher=submitit"]], with_hydra=True)
    assert cfg.hydra.launcher.gpus_per_node == 4


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp16")])
def test_auto_precision_takes_bf16_only_where_the_gpu_has_it(monkeypatch, native, expected):
    """A pre-Ampere GPU emulates bfloat16 (torch's plain is_bf16_supported() says yes):
    auto takes fp16 there."""
    from trainrun.precision import AutoConfig

    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: native or including_emulation)
    assert AutoConfig().mode(torch.device("cuda", 0)) == expected


def test_determinism_says_when_cublas_was_set_up_before_it(monkeypatch):
    """cuBLAS reads CUBLAS_WORKSPACE_CONFIG once per process: a deterministic run after an
    earlier CUDA run in the same process says that it keeps the earlier setting."""
    from trainrun import determinism

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    try:
        line = determinism.enable(True)
    finally:
        determinism.restore()
    assert "CUDA was used earlier in this process" in line
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    try:
        assert "earlier" not in determinism.enable(True)
    finally:
        determinism.restore()
