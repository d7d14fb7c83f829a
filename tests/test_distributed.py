"""More than one process (docs/distributed.md), with real processes: torchrun (gloo on CPU), two
"nodes" meeting through torchrun's c10d rendezvous, and tasks started with SLURM's
variables alone. N processes with micro-batch b must end where one process with micro-batch
N·b ends, on padded documents of very different lengths whose order crosses an epoch end."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import (
    assert_identical,
    cli,
    config,
    final_weights,
    make_corpus,
    scalars,
    tiny,
    wait_for,
    weights,
)
from test_accumulation import max_relative_difference
from test_validation import RTOL, args_without_eval, reference_val_loss

from trainrun.ranks import first_host, launch_size, slurm_environment

pytestmark = pytest.mark.slow
N = 10  # updates: 10 windows of 8 sequences cross the end of the ~57-sequence epoch


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("ddp") / "docs.txt", n_docs=60, seed=3)


def overrides(corpus: Path, batch_size: int, accum: int = 1, *more: str) -> list[str]:
    # SGD, as in test_accumulation: the weights move linearly with the summed gradient
    return tiny(corpus, "data.packing=false", f"data.batch_size={batch_size}",
                f"trainer.grad_accum_steps={accum}", f"trainer.max_steps={N}",
                "trainer.eval_every=5", "trainer.log_every=1", "optimizer=sgd",
                "optimizer.lr=0.5", "scheduler=constant", *more)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, cwd: Path, nproc: int = 2, script: bool = False,
             timeout: float = 300) -> subprocess.CompletedProcess:
    """torchrun -m trainrun ..., or with `script` torchrun <the trainrun console script> ..."""
    program = [str(Path(sys.executable).with_name("trainrun"))] if script else ["-m", "trainrun"]
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", *program, *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def only_run_dir(cwd: Path) -> Path:
    """The one run directory under cwd/outputs/<date>/<time>."""
    runs = [p for p in (cwd / "outputs").glob("*/*") if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


@pytest.mark.parametrize("accum", [1, 2])
def test_two_processes_train_as_one_with_twice_the_batch(docs, tmp_path, accum):
    one = cli(*overrides(docs, 8, accum), "hydra.run.dir=one", cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    two = torchrun(*overrides(docs, 4, accum), cwd=tmp_path, script=accum == 2)
    assert two.returncode == 0, two.stderr
    run = only_run_dir(tmp_path)  # both ranks took rank 0's timestamped directory
    assert max_relative_difference(final_weights(run), final_weights(tmp_path / "one")) < 1e-5
    # the same validation batches: N·(b) sequences per window, shared by the ranks
    assert json.loads((run / "metrics.json").read_text())["val_loss"] == pytest.approx(
        json.loads((tmp_path / "one/metrics.json").read_text())["val_loss"], rel=1e-5)
    assert [k for k, _ in scalars(run, "train/lr")] == list(range(1, N + 1))
    assert sorted(p.name for p in run.iterdir()) == sorted(
        p.name for p in (tmp_path / "one").iterdir())  # what one process writes, once
    assert two.stdout.count("done:") == 1 and "2 process(es)" in two.stdout
    log = (run / "train.log").read_text()
    assert log.count(f"step {N}/{N}") == 1 and f"x 2 process(es) = {8 * accum} sequences" in log


def test_validation_reads_the_same_sequences_for_batch_16_accumulation_4x4_and_2x8(
        finished_run, tmp_path):
    """The same weights (a trained model through model.init_from, then SGD at lr 1e-30,
    which moves no weight) give the same val_loss for one process with batch 16, accumulation
    4 x 4 and 2 processes x 8, and after a resume on 2 processes: that of a bare PyTorch loop
    over the first 27 sequences of the validation split (27: a short last micro-batch, and
    shares of 14 and 13 sequences for the 2 ranks)."""
    from trainrun.commands import export

    export.main([str(finished_run), str(tmp_path / "export")])
    trained = finished_run / "checkpoints/step-00000040/model.safetensors"
    corpus = make_corpus(tmp_path / "docs.txt", n_docs=120, seed=7)
    args = args_without_eval(corpus, "trainer.max_steps=1", "trainer.eval_sequences=27",
                             "optimizer=sgd", "optimizer.lr=1e-30", "scheduler=constant",
                             f"model.init_from={tmp_path / 'export'}")
    for name, shape in (("b16", ["data.batch_size=16"]),
                        ("a4x4", ["data.batch_size=4", "trainer.grad_accum_steps=4"])):
        proc = cli(*args, *shape, f"hydra.run.dir={name}", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
    proc = torchrun(*args, "data.batch_size=8", "hydra.run.dir=p2x8", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    proc = torchrun("resume=b16", "trainer.max_steps=2", "data.batch_size=8", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "validation now reads" not in proc.stdout

    expected = reference_val_loss(trained, config(*args), 27)
    for name in ("b16", "a4x4", "p2x8"):
        assert_identical(final_weights(tmp_path / name), weights(trained))  # the same weights
        val = scalars(tmp_path / name, "val/loss")
        # b16 was resumed on 2 processes x 8 and validated again at update 2
        assert [k for k, _ in val] == ([1, 2] if name == "b16" else [1]), name
        for _, loss in val:
            assert loss == pytest.approx(expected, rel=RTOL), name
    assert len({json.loads((tmp_path / n / "checkpoints/step-00000001/meta.json").read_text())[
        "validation"]["fingerprint"] for n in ("b16", "a4x4", "p2x8")}) == 1


def test_two_nodes_through_the_c10d_rendezvous(docs, tmp_path):
    port = free_port()
    args = overrides(docs, 4)
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
         f"--node_rank={rank}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
         "--rdzv-id=two-nodes", "-m", "trainrun", *args, "hydra.run.dir=nodes"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)]
    for node in nodes:
        out, err = node.communicate(timeout=300)
        assert node.returncode == 0, err
    single = torchrun(*args, "hydra.run.dir=single", cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    assert_identical(final_weights(tmp_path / "nodes"), final_weights(tmp_path / "single"))


def slurm_tasks(args: list[str], cwd: Path) -> list[subprocess.Popen]:
    """Two `trainrun` processes with the variables srun gives its tasks, and no torchrun's."""
    base = {k: v for k, v in os.environ.items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2",
             "SLURM_STEP_NODELIST": "127.0.0.1", "MASTER_PORT": str(free_port())}
    exe = Path(sys.executable).with_name("trainrun")
    return [subprocess.Popen(
        [str(exe), *args], cwd=cwd, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**base, **slurm, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)})
        for rank in (0, 1)]


def test_tasks_started_with_slurm_variables_only(docs, tmp_path):
    args = overrides(docs, 4)
    tasks = slurm_tasks([*args, "hydra.run.dir=slurm"], tmp_path)
    outs = [task.communicate(timeout=300) for task in tasks]
    assert [t.returncode for t in tasks] == [0, 0], outs
    assert "done:" in outs[0][0] and outs[1][0] == ""  # rank 1 prints nothing
    single = torchrun(*args, "hydra.run.dir=single", cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    assert_identical(final_weights(tmp_path / "slurm"), final_weights(tmp_path / "single"))


def test_sigterm_to_slurm_tasks_exits_143_after_one_update(docs, tmp_path):
    # scancel and srun signal every task, each at its own moment
    run = tmp_path / "slurm"
    tasks = slurm_tasks([*overrides(docs, 4), "trainer.max_steps=400", f"hydra.run.dir={run}"],
                        tmp_path)
    log = run / "train.log"
    wait_for(lambda: log.exists() and "step 20/" in log.read_text())
    for task in tasks:
        task.send_signal(signal.SIGTERM)
    outs = [task.communicate(timeout=120) for task in tasks]
    assert [t.returncode for t in tasks] == [143, 143], outs
    steps = json.loads((run / "metrics.json").read_text())["steps"]
    assert [p.name for p in (run / "checkpoints").glob("step-*")] == [f"step-{steps:08d}"]
    assert "torchrun --nproc_per_node=2 -m trainrun" in outs[0][0]


def test_a_signal_to_one_rank_stops_all_with_that_signal(docs, tmp_path):
    """SIGUSR1 to rank 1 alone: rank 0 learns it with the update's loss, and every rank
    stops after the same update, reports SIGUSR1 and exits 128 + 10."""
    run = tmp_path / "slurm"
    tasks = slurm_tasks([*overrides(docs, 4), "trainer.max_steps=400", f"hydra.run.dir={run}"],
                        tmp_path)
    log = run / "train.log"
    wait_for(lambda: log.exists() and "step 20/" in log.read_text())
    tasks[1].send_signal(signal.SIGUSR1)
    outs = [task.communicate(timeout=120) for task in tasks]
    assert [t.returncode for t in tasks] == [138, 138], outs
    steps = json.loads((run / "metrics.json").read_text())["steps"]
    assert f"SIGUSR1: stopped after update {steps}" in log.read_text()
    assert "SIGTERM" not in log.read_text()


def test_slurm_variables_become_torchruns():
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
           "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "123456",
           "SLURM_STEP_NODELIST": "gpu[07-08,11],cpu1"}
    assert slurm_environment(env) == {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                                      "MASTER_ADDR": "gpu07", "MASTER_PORT": "23456"}
    assert slurm_environment({**env, "WORLD_SIZE": "8"}) == {}  # torchrun's win
    no_step = {k: v for k, v in env.items() if k != "SLURM_STEP_ID"}
    assert slurm_environment(no_step) == {}  # a shell inside an allocation is one process
    assert first_host("node1") == "node1" and first_host("a[1-3]") == "a1"
    # before the group is made: the memory check and the sweep refusal count srun's tasks
    assert launch_size(env) == 8 and launch_size({"WORLD_SIZE": "2", **env}) == 2
    assert launch_size(no_step) == 1 and launch_size({}) == 1


def test_sigterm_stops_every_rank_after_the_same_update_and_resumes(docs, tmp_path):
    args = overrides(docs, 4, 1, "trainer.max_steps=400", "trainer.ckpt_every=1000",
                     "trainer.eval_every=1000", "trainer.log_every=1", "optimizer=momentum",
                     "optimizer.lr=0.1", "scheduler=cosine", "scheduler.warmup_steps=10")
    full = torchrun(*args, "hydra.run.dir=full", cwd=tmp_path)
    assert full.returncode == 0, full.stderr
    run = tmp_path / "stopped"
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "trainrun", *args, f"hydra.run.dir={run}"], cwd=tmp_path, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    log = run / "train.log"
    wait_for(lambda: log.exists() and "step 20/" in log.read_text())
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0  # torchrun reports the signal with its own exit status
    m = json.loads((run / "metrics.json").read_text())
    assert m["status"] == "stopped" and 20 <= m["steps"] < 400
    assert [p.name for p in (run / "checkpoints").glob("step-*")] == [f"step-{m['steps']:08d}"]
    assert log.read_text().count("SIGTERM: stopped after update") == 1
    assert f"resume={run}" in out
    again = tmp_path / "again"  # the same stopped run, resumed on one process below
    subprocess.run(["cp", "-r", str(run), str(again)], check=True)

    resumed = torchrun(f"resume={run}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((run / "metrics.json").read_text())["steps"] == 400
    assert_identical(final_weights(run), final_weights(tmp_path / "full"))

    alone = cli(f"resume={again}", "data.batch_size=8", cwd=tmp_path)
    assert alone.returncode == 0, alone.stderr
    assert "written by 2 process(es) with updates of 8 sequences; this run has 1, with " \
        "updates of 8: the data order continues" in alone.stdout
    assert json.loads((again / "metrics.json").read_text())["steps"] == 400
    # momentum SGD moves linearly with the gradients: 1 x 8 continues 2 x 4's updates
    assert max_relative_difference(final_weights(again), final_weights(tmp_path / "full")) < 1e-5


def test_fsdp_matches_ddp_and_resumes_on_one_process(docs, tmp_path):
    # clip.max_norm below the gradients' norm: the global norm over the shards clips
    args = overrides(docs, 4, 2, "optimizer=momentum", "clip.max_norm=0.3",
                     "trainer.ckpt_every=5")
    ddp = torchrun(*args, "hydra.run.dir=ddp", cwd=tmp_path)
    assert ddp.returncode == 0, ddp.stderr
    fsdp = torchrun(*args, "trainer.strategy=fsdp", "hydra.run.dir=fsdp", cwd=tmp_path)
    assert fsdp.returncode == 0, fsdp.stderr
    run = tmp_path / "fsdp"
    clip = [v for _, v in scalars(run, "train/clip_coef")]
    assert min(clip) < 1 and clip == pytest.approx(
        [v for _, v in scalars(tmp_path / "ddp", "train/clip_coef")], rel=1e-5)
    assert max_relative_difference(final_weights(run), final_weights(tmp_path / "ddp")) < 1e-5
    shards = sorted(p.name for p in (run / "checkpoints/step-00000010/sharded").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    meta = json.loads((run / "checkpoints/step-00000010/meta.json").read_text())
    assert sorted(meta["sha256"]) == ["model.safetensors", *(f"sharded/{n}" for n in shards),
                                      "trainer_state.pt"]

    # saved on 2 ranks, resumed on 1 (the same windows: micro-batch 8, accumulation 2)
    rewound = tmp_path / "rewound"
    subprocess.run(["cp", "-r", str(run), str(rewound)], check=True)
    subprocess.run(["rm", "-r", str(rewound / "checkpoints/step-00000010")], check=True)
    (rewound / "checkpoints/latest").write_text("step-00000005\n")
    alone = cli(f"resume={rewound}", "data.batch_size=8", cwd=tmp_path)
    assert alone.returncode == 0, alone.stderr
    assert "resumed from" in alone.stdout and "step-00000005" in alone.stdout
    assert max_relative_difference(final_weights(rewound), final_weights(run)) < 1e-5

    refused = cli(f"resume={rewound}", "trainer.strategy=ddp", cwd=tmp_path)
    assert refused.returncode == 2 and refused.stderr.startswith(
        "trainrun: error: trainer.strategy: the checkpoint step-00000010 was trained with 'fsdp'")


def test_a_sweep_is_refused_inside_a_distributed_launch(docs, tmp_path):
    proc = torchrun("-m", *overrides(docs, 4), "optimizer.lr=0.1,0.2", cwd=tmp_path)
    assert proc.returncode != 0
    assert "trainrun: error: --multirun: a sweep cannot run inside a distributed launch" \
        in proc.stderr
    assert not (tmp_path / "multirun").exists()


def test_fsdp_shards_the_average_saves_it_and_resumes_it_bit_for_bit(docs, tmp_path):
    """trainer.ema_decay under FSDP: each rank keeps the average of its shards, saved with
    them (and whole in model_ema.safetensors), continued exactly by a resume on 2 ranks."""
    from trainrun import checkpoint

    args = overrides(docs, 4, 1, "optimizer=momentum", "trainer.ckpt_every=5",
                     "trainer.ema_decay=0.6")
    fsdp = torchrun(*args, "trainer.strategy=fsdp", "hydra.run.dir=fsdp", cwd=tmp_path)
    assert fsdp.returncode == 0, fsdp.stderr
    run = tmp_path / "fsdp"
    meta = json.loads((run / "checkpoints/step-00000010/meta.json").read_text())
    assert checkpoint.EMA_FILE in meta["sha256"]
    ddp = torchrun(*args, "hydra.run.dir=ddp", cwd=tmp_path)
    assert ddp.returncode == 0, ddp.stderr
    average = weights(run / "checkpoints/step-00000010" / checkpoint.EMA_FILE)
    assert max_relative_difference(
        average, weights(tmp_path / "ddp/checkpoints/step-00000010" / checkpoint.EMA_FILE)) < 1e-5
    assert [v for _, v in scalars(run, "val/loss_ema")] == pytest.approx(
        [v for _, v in scalars(tmp_path / "ddp", "val/loss_ema")], rel=1e-5)

    rewound = tmp_path / "rewound"
    subprocess.run(["cp", "-r", str(run), str(rewound)], check=True)
    subprocess.run(["rm", "-r", str(rewound / "checkpoints/step-00000010")], check=True)
    (rewound / "checkpoints/latest").write_text("step-00000005\n")
    again = torchrun(f"resume={rewound}", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert_identical(weights(rewound / "checkpoints/step-00000010" / checkpoint.EMA_FILE),
                     average)
    assert_identical(final_weights(rewound), final_weights(run))
