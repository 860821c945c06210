"""``wan-trt infer --gpus N``: run inference as N torchrun processes, the DiT sequence-parallel over them.

The command checks what it can cheaply (backend, GPU count, the DiT's head count, engines), writes
the inference options to a temporary JSON file and starts N workers
(``python -m wan_trt.launch``) with the launcher behind ``torchrun --standalone``.
Each worker joins the process group (NCCL with one GPU each for ``--device cuda``, gloo for
``--device cpu``) and runs the whole ``run_inference``: the encoders, the VAE and the scheduler are
computed on every rank (identical inputs and seed give identical results), the DiT is
sequence-parallel (``wan_trt.runtime.sequence_parallel``) and returns the whole velocity on every
rank, so all ranks follow the same denoising path. Only rank 0 logs progress and writes the mp4.
Each worker leaves its exit code and error in a status file; the command exits with rank 0's code
(or the first failing rank's) and prints each distinct error once.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import tempfile
import uuid
from pathlib import Path

import torch
import torch.distributed as dist

from wan_trt.errors import BadInputError, EngineError, WanTrtError

log = logging.getLogger(__name__)


def is_main_rank() -> bool:
    """True outside a process group and on rank 0 of one (the rank that writes files and logs)."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def check_launch(options) -> None:
    """What ``--gpus N`` needs of the machine and the engines, checked before any process starts."""
    from wan_trt.runtime.manifest import read_manifest
    from wan_trt.runtime.sequence_parallel import check_world_size

    gpus = options.runtime.gpus  # the rules between the options: checked when they were made (RuntimeOptions)
    if options.runtime.device == "cuda" and torch.cuda.device_count() < gpus:
        raise EngineError(f"--gpus {gpus}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    manifest = read_manifest(options.engines_dir)
    check_world_size(int(manifest.preset.transformer["num_attention_heads"]), gpus)
    if manifest.quantization:
        raise BadInputError(f"--gpus {gpus}: the sequence-parallel DiT takes fp32 engines; "
                            f"'{options.engines_dir}' holds {manifest.precision} engines")


def launch_infer(options) -> int:
    """Run ``run_inference(options)`` as ``options.runtime.gpus`` torchrun workers; return the exit code.

    Uses the launcher behind ``torchrun --standalone`` (``torch.distributed.launcher.api.elastic_launch``)
    in this process, so that a worker's failure ends as one error line and its exit code rather than
    torchrun's failure report.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    check_launch(options)
    gpus, device = options.runtime.gpus, options.runtime.device
    with tempfile.TemporaryDirectory(prefix="wan-trt-gpus-") as scratch:
        options_file = Path(scratch) / "options.json"
        options_file.write_text(json.dumps(options.to_json()))
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // gpus)))
        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=gpus, run_id=str(uuid.uuid4()),
                              rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.5)
        log.info("starting %d processes (%s, torchrun --standalone): %s -m wan_trt.launch", gpus,
                 "NCCL, one GPU each" if device == "cuda" else "gloo on the CPU", sys.executable)
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # failures: our status files
        failed = False
        try:
            elastic_launch(config, sys.executable)("-m", "wan_trt.launch", str(options_file), scratch)
        except ChildFailedError:
            failed = True
        except SignalException as stop:  # SIGTERM/SIGINT: the agent has stopped the workers
            raise SystemExit(128 + int(stop.sigval)) from None
        statuses = sorted(Path(scratch).glob("rank*.json"), key=lambda p: int(p.stem[4:]))
        results = [json.loads(p.read_text()) for p in statuses]
    return _exit_code(results, failed, gpus)


def _exit_code(results: list[dict], failed: bool, gpus: int) -> int:
    """Rank 0's code, else the first failing rank's; each distinct error of the other ranks printed once."""
    bad = [r for r in results if r["code"]]
    shown = {r["message"] for r in results if r["rank"] == 0}  # rank 0 printed its own
    for message in dict.fromkeys(r["message"] for r in bad if r["message"] and r["message"] not in shown):
        print(f"wan-trt: error: {message}", file=sys.stderr)
    if bad:
        return bad[0]["code"]
    if failed or len(results) < gpus:
        print("wan-trt: error: a worker process died without reporting why; see the log above", file=sys.stderr)
        return 1
    return 0


def _load_options(path: Path):
    from wan_trt.inference import InferenceOptions

    return InferenceOptions.from_json(json.loads(path.read_text()))


def worker_main(options_file: str, status_dir: str) -> int:
    """One torchrun worker: join the group, run the inference, leave the exit code in ``status_dir``."""
    from wan_trt.inference import run_inference

    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname).1s rank{rank} %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("torch", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # unwind: partial files removed
    code, message = 0, None
    try:
        options = _load_options(Path(options_file))
        if int(os.environ["WORLD_SIZE"]) != options.runtime.gpus:
            raise EngineError(f"started with {os.environ['WORLD_SIZE']} processes for --gpus {options.runtime.gpus}")
        if options.runtime.device == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if options.runtime.device == "cuda" else "gloo")
        # every rank has joined before any may leave: a rank that fails fast (a bad input) and exits
        # while another is still connecting would turn that rank's clear error into a gloo crash
        dist.barrier()
        run_inference(options)
        dist.barrier()  # rank 0 has written the mp4
    except WanTrtError as error:
        code, message = error.exit_code, str(error)
    except Exception as error:  # reported with its traceback, exit code 1
        log.exception("rank %d failed", rank)
        code, message = 1, f"rank {rank}: {type(error).__name__}: {error}"
    # The process group is not destroyed: the worker ends with os._exit right after reporting (see
    # __main__), because gloo's teardown sometimes aborts a finished process (SIGABRT at exit).
    if code and rank == 0:
        print(f"wan-trt: error: {message}", file=sys.stderr)
    Path(status_dir, f"rank{rank}.json").write_text(json.dumps({"rank": rank, "code": code, "message": message}))
    return code


if __name__ == "__main__":  # pragma: no cover - started by launch_infer through torchrun
    exit_code = worker_main(sys.argv[1], sys.argv[2])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)  # skip the process group's and the interpreter's teardown (see worker_main)
