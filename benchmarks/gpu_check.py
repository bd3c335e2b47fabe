"""The prepared GPU run: benchmarks on CUDA and a short ResNet-20 CIFAR-10 QCFS/NQ pair,
inside one time budget, everything written to one folder.

    bash benchmarks/gpu_check.sh [--out DIR] [--data ARCHIVE] [--budget SECONDS] [--dry-run]
    python benchmarks/gpu_check.py  (same options; the .sh picks the Python and installs carried wheels)

Steps, in order; each runs in its own process group under a timeout (its cap, and never
past what the later steps need), and one that fails or times out is recorded and skipped:

  env            gpu_env.txt   nvidia-smi, torch / CUDA / cuDNN versions, device properties
  simulate fp32  simulate.md   benchmarks/simulate.py parts on CUDA (fp32; cuDNN TF32 as torch
                               defaults), batch 256: layouts, all-T, memory, T-scaling, roofline
  simulate amp   simulate.md   the same under fp16 autocast with channels_last (speed, all-T,
                               scaling, roofline)
  activation cpu activation.md benchmarks/activation.py --quick as it is (it has no device option:
                               it measures the host's CPU; the note written there says what it
                               would need for CUDA)
  activation cuda activation.md the training step of activation.py's variants on CUDA (fp32 NCHW;
                               AMP + channels_last), with activation.py's own model builders
  data           (log)         decode the CIFAR-10 archive once into the harness cache
  train pair     train_pair.md, qcfs_result.json, nq_result.json
                               ResNet-20, the paper's CIFAR-10 recipe (search_spaces/
                               paper_table1_cifar10.yaml: SGD 0.1 cosine, batch 128,
                               AutoAugment + Cutout, L = tau = 4), train.device=cuda, amp,
                               channels_last; the uint8 dataset is held on the GPU by the harness
                               Loader. QCFS and NQ (layer-wise) run side by side on the one GPU.
                               A 1-epoch probe of both measures start-up, epoch and final-test
                               times; the pair then runs as many epochs E as fit (a fresh cosine
                               schedule over E), and stops after an epoch early (then finishes
                               on its best checkpoint) if the epochs turn out slower.
  summary        summary.md    what ran, what was skipped and why, with times

log.txt holds everything the steps printed. At most 8 files, all at the top of --out.

--dry-run: every step at toy size on the CPU (synthetic images, cnn_small for 1 + 2 epochs,
quick benchmarks at batch 2, eager kernels), to test this script: about a minute of CPU time
(nine Python processes that each import torch); caps and budget are 4x / 900 s there.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FILES = ("summary.md", "gpu_env.txt", "simulate.md", "activation.md", "train_pair.md",
         "qcfs_result.json", "nq_result.json", "log.txt")
DEFAULT_BUDGET = 510          # seconds for the whole script (the device tool allows 600 per command)
TRAIN_MIN = 150               # the pair is skipped with less than this left
TRAIN_RESERVE = 240           # benchmark steps never eat into the last this-many seconds
MARGIN = 15                   # seconds kept free at the end (summary, copying, slack)
ARCHIVE = "cifar10-jpeg.tar.gz"
SPACE = ROOT / "search_spaces" / "paper_table1_cifar10.yaml"
METHODS = (("qcfs", "qcfs"), ("nq", "layerwise"))  # (file prefix, noise.mode)
MAX_EPOCHS = 200
DRY_BUDGET, DRY_CAP_FACTOR = 900, 4  # a dry run's caps and budget are generous: it tests the logic


# ----------------------------------------------------------------------------- plan and log

class Log:
    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.Lock()
        self.f = open(path, "a", buffering=1, encoding="utf-8")

    def __call__(self, msg: str) -> None:
        with self.lock:
            self.f.write(msg + "\n")
            print(msg, flush=True)


class Plan:
    def __init__(self, budget: float):
        self.t0 = time.time()
        self.budget = budget
        self.end = self.t0 + budget - MARGIN
        self.steps: list[dict] = []

    def left(self) -> float:
        return self.end - time.time()

    def elapsed(self) -> float:
        return time.time() - self.t0


def archive_path(given: str | None) -> Path | None:
    """--data, else $CIFAR_ARCHIVE, else .data/<archive> in the checkout, else ../shared/data/."""
    for c in (given, os.environ.get("CIFAR_ARCHIVE"), ROOT / ".data" / ARCHIVE,
              ROOT.parent / "shared" / "data" / ARCHIVE):
        if c and Path(c).is_file():
            return Path(c).resolve()
    return None


def run_step(plan: Plan, log: Log, name: str, cmd: list[str], cap: float, *, reserve: float = 0.0,
             stdout_to: Path | None = None, min_s: float = 10.0, env: dict | None = None) -> dict:
    """Run `cmd` in its own process group with timeout min(cap, time left - reserve). Its
    stderr goes to the log as it comes; its stdout to `stdout_to` (else the log)."""
    rec = dict(step=name, cap_s=cap)
    timeout = min(cap, plan.left() - reserve)
    if timeout < min_s:
        rec.update(status="skipped", why=f"budget: {max(timeout, 0):.0f} s left for it (< {min_s:.0f} s)", wall_s=0.0)
        log(f"== {name}: SKIPPED ({rec['why']})")
        plan.steps.append(rec)
        return rec
    log(f"== {name}: start (timeout {timeout:.0f} s, {plan.elapsed():.0f} s into the budget)")
    log(f"   $ {' '.join(cmd)}")
    t0 = time.time()
    out_f = open(stdout_to, "a", encoding="utf-8") if stdout_to else None
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out_f or subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env={**os.environ, **(env or {})})
    pumps = [threading.Thread(target=_pump, args=(proc.stderr, log, name), daemon=True)]
    if out_f is None:
        pumps.append(threading.Thread(target=_pump, args=(proc.stdout, log, name), daemon=True))
    for t in pumps:
        t.start()
    try:
        rc = proc.wait(timeout=timeout)
        rec.update(status="ok" if rc == 0 else "failed", rc=rc)
    except subprocess.TimeoutExpired:
        _kill(proc)
        rec.update(status="timed out", rc=None)
    for t in pumps:
        t.join(timeout=5)
    if out_f:
        out_f.close()
    rec.update(wall_s=time.time() - t0, timeout_s=timeout)
    log(f"== {name}: {rec['status'].upper()} after {rec['wall_s']:.0f} s" + (f" (exit {rec['rc']})" if rec.get("rc") else ""))
    plan.steps.append(rec)
    return rec


def _pump(stream, log: Log, name: str) -> None:
    for line in iter(stream.readline, ""):
        log(f"[{name}] {line.rstrip()}")
    stream.close()


def _kill(proc: subprocess.Popen) -> None:
    """End the step's own process group (started with start_new_session)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


def me(mode: str, spec: dict) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), mode, json.dumps(spec)]


# ----------------------------------------------------------------------------- workers (own processes)

def env_worker(spec: dict) -> None:
    import platform

    import torch

    lines = [f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}", f"host: {platform.node()}",
             f"platform: {platform.platform()}", f"python: {sys.version.split()[0]} ({sys.executable})",
             f"torch: {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}",
             f"os.cpu_count(): {os.cpu_count()}; torch threads: {torch.get_num_threads()}",
             f"cuda available: {torch.cuda.is_available()}"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i}: {p.name}, capability {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB, "
                         f"{p.multi_processor_count} SMs")
        lines.append(f"TF32: matmul {torch.backends.cuda.matmul.allow_tf32}, cuDNN {torch.backends.cudnn.allow_tf32}; "
                     f"cudnn.benchmark {torch.backends.cudnn.benchmark}")
    from importlib import metadata
    for pkg in ("numpy", "pydantic", "pyyaml", "pillow", "timm", "spikingjelly", "triton", "mlflow", "filelock"):
        try:
            lines.append(f"{pkg}: {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            lines.append(f"{pkg}: not installed")
    for cmd in (["git", "-C", str(ROOT), "rev-parse", "HEAD"], ["nvidia-smi"],
                ["nvidia-smi", "--query-gpu=clocks.max.sm,clocks.sm,power.limit,temperature.gpu", "--format=csv"]):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
            lines.append(f"$ {' '.join(cmd)}\n{(r.stdout or r.stderr).rstrip()}")
        except (OSError, subprocess.SubprocessError) as e:
            lines.append(f"$ {' '.join(cmd)}: {type(e).__name__}")
    lines.append(f"plan: {json.dumps(spec)}")
    Path(spec["out"]).write_text("\n".join(lines) + "\n")


def simulate_worker(spec: dict) -> None:
    """simulate.py's parts one at a time, each appended to the file as soon as it is done
    (a timeout loses only the part under way)."""
    from benchmarks import simulate as sim

    setup = sim.Setup(spec["device"], spec["amp"], spec["channels_last"])
    parts = tuple(spec["parts"])
    out = Path(spec["out"])
    cmd = sim.command(spec["quick"], spec["threads"], spec["reps"], setup, spec["batch"], parts)
    with open(out, "a", encoding="utf-8") as f:
        try:
            where = setup.describe()
        except Exception:  # noqa: BLE001 - no CUDA: iter_parts says so below
            where = setup.device
        f.write(f"## Simulation: {where}\n\nReproduce: `{cmd}`\n\n")
        f.flush()
        t0 = time.perf_counter()
        for title, body in sim.iter_parts(spec["quick"], spec["threads"], spec["reps"], setup=setup,
                                          batch=spec["batch"], parts=parts):
            f.write(f"### {title}\n\n{body}\n\n")
            f.flush()
            print(f"simulate: {title} done at {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        f.write(f"{sim.targets_line(spec['quick'])} Wall time {time.perf_counter() - t0:.0f} s.\n\n")


ACTIVATION_CUDA_NEEDS = (
    "benchmarks/activation.py has no CUDA option. To measure on a GPU it would need: `--device cuda` "
    "(model, inputs and labels moved there; the noise draws then come from the CUDA generator), "
    "`torch.cuda.synchronize` passed to `interleaved(..., sync=...)` so that each timed call ends when "
    "the GPU does, and `--amp` / `--channels-last` (the training step under `torch.autocast` with a "
    "`GradScaler`, weights and inputs in channels_last), as `harness.train` runs it with train.amp and "
    "train.channels_last. The section below does this with activation.py's own helpers.")


def activation_worker(spec: dict) -> None:
    """The training step of activation.py's variants on `spec['device']`, appended to the file."""
    import copy

    import torch
    import torch.nn.functional as F
    from torch import nn

    import harness
    from benchmarks._common import interleaved, ratio, table
    from benchmarks.activation import DELTA, _env, _variant, _with_grad
    from harness.calibration import set_deltas

    dev = torch.device(spec["device"])
    B, steps, reps = spec["batch"], spec["steps"], spec["reps"]
    sync = torch.cuda.synchronize if dev.type == "cuda" else None
    torch.manual_seed(0)
    base = harness.create_model("resnet20", num_classes=10, L=4, lam_init=8.0)
    nq, qc = copy.deepcopy(base), copy.deepcopy(base)
    set_deltas(nq, DELTA)
    set_deltas(qc, 0.0)
    g = torch.Generator().manual_seed(0)
    x0, y0 = torch.randn(B, 3, 32, 32, generator=g), torch.randint(0, 10, (B,), generator=g)

    def stepper(model: nn.Module, amp: bool, cl: bool, env=None):
        fmt = torch.channels_last if cl else torch.contiguous_format
        model = model.to(dev, memory_format=fmt)
        x, y = x0.to(dev).contiguous(memory_format=fmt), y0.to(dev)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        scaler = torch.amp.GradScaler("cuda", enabled=amp and dev.type == "cuda")

        def step():
            for _ in range(steps):
                with torch.autocast(dev.type, enabled=amp and dev.type == "cuda"):
                    loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            return loss

        if env is None:
            return step

        def with_env():
            with _env(*env):
                return step()
        return with_env

    rows, t0 = [], time.perf_counter()
    for amp, cl in spec["settings"]:
        label = ("AMP fp16" if amp else "fp32") + (", channels_last" if cl else ", NCHW")
        fns = {"ReLU": stepper(_variant(base, lambda a: nn.ReLU()), amp, cl),
               f"NQ (δ={DELTA}), fused": stepper(_variant(nq, _with_grad("nq")), amp, cl),
               "QCFS (δ=0), fused": stepper(_variant(qc, _with_grad("nq")), amp, cl),
               f"NQ (δ={DELTA}), eager ops (HARNESS_FUSED=0)": stepper(_variant(nq, _with_grad("nq")), amp, cl,
                                                                      ("HARNESS_FUSED", "0"))}
        med = interleaved(fns, reps, sync=sync)
        relu = med["ReLU"]
        rows += [[label, n, s / steps * 1e3, B * steps / s, ratio(s, relu)] for n, s in med.items()]
        print(f"activation: {label} done at {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU"
    with open(spec["out"], "a", encoding="utf-8") as f:
        f.write(f"## Activation training step on {name} (gpu_check.py)\n\n{ACTIVATION_CUDA_NEEDS}\n\n"
                f"ResNet-20, batch {B}, random 3×32×32 input, SGD (momentum 0.9, wd 5e-4), train mode, the "
                f"default ('nq') gradient; median of {reps} interleaved repetitions of {steps} step(s) after one "
                + ("warm-up, each ending with torch.cuda.synchronize()." if sync else "warm-up.")
                + (" HARNESS_FUSED=0 was set for this run: every variant ran eager ops."
                   if os.environ.get("HARNESS_FUSED") == "0" else "") + "\n\n"
                + table(["setting", "activation", "ms / step", "images/s", "vs ReLU"], rows) + "\n\n")


def data_worker(spec: dict) -> None:
    """Decode the dataset once into the harness cache (the pair's workers then read the cache)."""
    from harness.config import Config
    from harness.data import load_dataset

    cfg = Config.from_dict(spec["config"])
    t0 = time.perf_counter()
    d = load_dataset(cfg.data, cfg.train.seed)
    print(f"data: {cfg.data.name} {d.source}: train {tuple(d.train_x.shape)}, val {tuple(d.val_x.shape)}, "
          f"test {tuple(d.test_x.shape)} in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)


class _Stop(Exception):
    pass


def train_worker(spec: dict) -> None:
    """One method of the pair: `harness.train.run` with a callback that prints each epoch and
    stops after an epoch when the next would end past `stop_at`; a stopped run is finished
    at once (best checkpoint on test at every T) by resuming it with train.epochs = epochs done."""
    import torch

    from harness.config import Config
    from harness.train import run

    t_launch = spec["t_launch"]
    cfg = Config.from_dict(spec["config"])
    out = Path(spec["out"])
    stamps = {"import_s": time.time() - t_launch}

    def emit(kind: str, **kw) -> None:
        print(json.dumps({"kind": kind, "t": time.time(), **kw}), flush=True)

    def on_start(info: dict) -> None:
        stamps["start"] = time.time()
        emit("start", startup_s=time.time() - t_launch, device=str(torch.cuda.get_device_name())
             if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu")

    def on_epoch(rec: dict, _out: Path) -> None:
        emit("epoch", epoch=rec["epoch"], epoch_s=rec["epoch_s"], train_s=rec["train_s"],
             calib_s=rec.get("calib_s"), eval_s=rec.get("eval_s"), train_loss=rec["train_loss"],
             ann_val_acc=rec.get("ann_val_acc"), snn_sel_acc=rec.get("snn_sel_acc"))
        left = cfg.train.epochs - rec["epoch"]
        if left > 0 and spec.get("stop_at") and time.time() + 1.05 * rec["epoch_s"] > spec["stop_at"]:
            raise _Stop(rec["epoch"])

    try:
        run(cfg, out, callbacks=[on_epoch], on_start=on_start, progress=False)
        stopped = None
    except _Stop as s:
        stopped = int(s.args[0])
        emit("stopped", after_epoch=stopped, of=cfg.train.epochs)
        d = cfg.to_dict()
        d["train"]["epochs"] = stopped
        t_fin = time.time()
        run(Config.from_dict(d), out, progress=False)  # resumes: no epoch left, finish() only
        emit("finished_stopped", finish_s=time.time() - t_fin)
    emit("done", stopped_after=stopped, total_s=time.time() - t_launch, import_s=stamps["import_s"])


# ----------------------------------------------------------------------------- the training pair

def pair_config(archive: Path | None, dry: bool, threads: int) -> dict:
    """The base config of the pair (noise.mode and train.epochs set per run)."""
    import yaml

    if dry:
        return {"data": {"name": "synthetic", "batch_size": 32, "eval_batch_size": 100,
                         "synthetic": {"num_train": 320, "num_test": 100, "size": 16, "channels": 3}},
                "model": {"arch": "cnn_small", "L": 4},
                "noise": {"tau": 2},
                "train": {"lr": 0.05, "seed": 0, "threads": threads, "device": "cpu"},
                "eval": {"T": [1, 2, 4], "select_T": 2}}
    raw = yaml.safe_load(SPACE.read_text())
    cfg = {k: raw[k] for k in ("data", "model", "noise", "train", "eval") if k in raw}
    cfg["data"].update(name="imagefolder", root=str(archive), download=False)
    cfg["train"].update(device="cuda", amp=True, channels_last=True, seed=0, threads=threads)
    return cfg


def with_run(base: dict, mode: str, epochs: int) -> dict:
    import copy

    d = copy.deepcopy(base)
    d.setdefault("noise", {})["mode"] = mode
    d["train"]["epochs"] = int(epochs)
    return d


def plan_epochs(left_s: float, startup_s: float, epoch_s: float, finish_s: float, max_epochs: int,
                slack: float = 1.10) -> int:
    """Epochs that fit in `left_s`: start-up + E epochs + the final test, with `slack` on the
    per-epoch and final-test times. 0 if not even one fits."""
    room = left_s - startup_s - slack * finish_s
    if room <= 0 or epoch_s <= 0:
        return 0
    return max(0, min(max_epochs, int(math.floor(room / (slack * epoch_s)))))


def _launch_pair(plan: Plan, log: Log, base: dict, epochs: int, scratch: Path, tag: str, timeout: float,
                 stop_at: float | None) -> dict[str, dict]:
    """Both methods side by side; returns {prefix: {events, rc, status, out}}."""
    procs = {}
    for prefix, mode in METHODS:
        out = scratch / f"{tag}_{prefix}"
        shutil.rmtree(out, ignore_errors=True)
        spec = dict(config=with_run(base, mode, epochs), out=str(out), t_launch=time.time(), stop_at=stop_at)
        ev = scratch / f"{tag}_{prefix}.events"
        f = open(ev, "w", encoding="utf-8")
        p = subprocess.Popen(me("--train-worker", spec), cwd=ROOT, stdout=f, stderr=subprocess.PIPE, text=True,
                             start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        th = threading.Thread(target=_pump, args=(p.stderr, log, f"{tag} {prefix}"), daemon=True)
        th.start()
        procs[prefix] = dict(proc=p, f=f, ev=ev, out=out, th=th)
        log(f"   {tag} {prefix}: noise.mode={mode}, train.epochs={epochs}, pid {p.pid}")
    t_end = time.time() + timeout
    res = {}
    for prefix, d in procs.items():
        try:
            rc = d["proc"].wait(timeout=max(1.0, t_end - time.time()))
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            _kill(d["proc"])
            rc, status = None, "timed out"
        d["th"].join(timeout=5)
        d["f"].close()
        events = [json.loads(line) for line in d["ev"].read_text().splitlines() if line.startswith("{")]
        for e in events:
            if e["kind"] == "epoch":
                log(f"   {tag} {prefix}: epoch {e['epoch']} {e['epoch_s']:.1f} s (train {e['train_s']:.1f}), "
                    f"loss {e['train_loss']:.3f}, ANN val {e.get('ann_val_acc')}, SNN sel {e.get('snn_sel_acc')}")
        res[prefix] = dict(events=events, rc=rc, status=status, out=d["out"])
        log(f"   {tag} {prefix}: {status}" + (f" (exit {rc})" if rc else ""))
    return res


def _times(res: dict[str, dict]) -> dict[str, float]:
    """Worst case over the two methods: start-up, slowest epoch, final test (s)."""
    startup = epoch = finish = 0.0
    for r in res.values():
        ev = r["events"]
        st = next((e for e in ev if e["kind"] == "start"), None)
        eps = [e for e in ev if e["kind"] == "epoch"]
        done = next((e for e in ev if e["kind"] == "done"), None)
        if st is None or not eps or done is None:
            return {}
        startup = max(startup, st["startup_s"])
        epoch = max(epoch, max(e["epoch_s"] for e in eps))
        finish = max(finish, done["t"] - eps[-1]["t"])
    return dict(startup_s=startup, epoch_s=epoch, finish_s=finish)


def train_pair(plan: Plan, log: Log, args, outdir: Path, archive: Path | None) -> None:
    rec = dict(step="train pair", cap_s=None)
    try:
        _train_pair(plan, log, args, outdir, archive, rec)
    except Exception as e:  # noqa: BLE001 - recorded; the summary is still written
        import traceback

        log(traceback.format_exc().rstrip())
        rec.update(status="failed", why=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    finally:
        rec.setdefault("status", "failed")
        plan.steps.append(rec)  # after the data step's own row


def _train_pair(plan: Plan, log: Log, args, outdir: Path, archive: Path | None, rec: dict) -> None:
    name = rec["step"]
    t0 = time.time()
    if not args.dry_run and archive is None:
        rec.update(status="skipped", why=f"no CIFAR-10 archive (--data, $CIFAR_ARCHIVE, .data/{ARCHIVE}, "
                                         f"../shared/data/{ARCHIVE})", wall_s=0.0)
        log(f"== {name}: SKIPPED ({rec['why']})")
        _write_pair_md(outdir, rec, {}, None, None, args)
        return
    dry = args.dry_run
    threads = max(1, (os.cpu_count() or 2) // 2) if not dry else 1
    base = pair_config(archive, dry, threads)
    data = run_step(plan, log, "data", me("--data-worker", {"config": with_run(base, "qcfs", 1)}), cap=120,
                    reserve=0 if dry else TRAIN_MIN - 30, min_s=5 if dry else 20)
    if data["status"] != "ok":
        rec.update(status="skipped", why=f"the data step {data['status']}", wall_s=time.time() - t0)
        log(f"== {name}: SKIPPED ({rec['why']})")
        _write_pair_md(outdir, rec, {}, None, None, args)
        return
    if plan.left() < TRAIN_MIN * (0.1 if args.dry_run else 1):
        rec.update(status="skipped", why=f"budget: {plan.left():.0f} s left (< {TRAIN_MIN} s)", wall_s=time.time() - t0)
        log(f"== {name}: SKIPPED ({rec['why']})")
        _write_pair_md(outdir, rec, {}, None, None, args)
        return
    scratch = Path(tempfile.mkdtemp(prefix="gpu_check_pair_"))
    try:
        _probe_and_pair(plan, log, args, outdir, base, scratch, rec, t0)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _probe_and_pair(plan: Plan, log: Log, args, outdir: Path, base: dict, scratch: Path, rec: dict,
                    t0: float) -> None:
    name = rec["step"]
    # 1. the probe: one epoch of each, side by side, finished (final test at every T)
    log(f"== {name}: probe (1 epoch of each, then the final test) in {scratch}, {plan.left():.0f} s left")
    probe = _launch_pair(plan, log, base, 1, scratch, "probe", timeout=plan.left(), stop_at=None)
    times = _times(probe)
    final, sizing = probe, None
    if not times:
        rec.update(status="failed", why="the probe did not finish", wall_s=time.time() - t0)
    else:
        E = plan_epochs(plan.left(), times["startup_s"], times["epoch_s"], times["finish_s"], args.max_epochs)
        sizing = dict(**times, left_s=plan.left(), epochs=E)
        log(f"== {name}: probe times (worst of the two) start-up {times['startup_s']:.0f} s, epoch "
            f"{times['epoch_s']:.1f} s, final test {times['finish_s']:.0f} s; {plan.left():.0f} s left -> E = {E}")
        rec.update(status="ok (probe only)", epochs=1)
        if E >= 2:
            # a stopped run is rebuilt (cached data, model) before its final test
            stop_at = plan.end - 1.10 * times["finish_s"] - times["startup_s"]
            full = _launch_pair(plan, log, base, E, scratch, "run", timeout=plan.left(), stop_at=stop_at)
            if all(r["status"] == "ok" for r in full.values()):
                final = full
                rec.update(status="ok", epochs=E)
            else:
                rec.update(status="ok (probe only)", why="the E-epoch pair did not finish: "
                           + ", ".join(f"{k} {v['status']}" for k, v in full.items()))
        else:
            rec.update(why=f"E = {E}: no room for more than the probe's epoch")
    rec["wall_s"] = time.time() - t0
    results = {}
    for prefix, _ in METHODS:
        src = final[prefix]["out"] / "result.json"
        if src.exists():
            shutil.copy2(src, outdir / f"{prefix}_result.json")
            results[prefix] = json.loads(src.read_text())
    if len(results) < 2 and rec["status"].startswith("ok"):
        rec.update(status="failed", why="no result.json from " + ", ".join(p for p, _ in METHODS if p not in results))
    log(f"== {name}: {rec['status'].upper()} after {rec['wall_s']:.0f} s" + (f" ({rec['why']})" if rec.get("why") else ""))
    _write_pair_md(outdir, rec, results, final, sizing, args)


def _write_pair_md(outdir: Path, rec: dict, results: dict, runs: dict | None, sizing: dict | None, args) -> None:
    from benchmarks._common import fmt

    lines = ["# ResNet-20 CIFAR-10: QCFS / NQ pair on the GPU" if not args.dry_run else
             "# Dry run: cnn_small on synthetic images, QCFS / NQ pair on the CPU", "",
             f"Status: **{rec['status']}**" + (f" — {rec['why']}" if rec.get("why") else "")
             + f"; {rec.get('wall_s', 0):.0f} s.", ""]
    if sizing:
        lines += [f"Sizing: a 1-epoch probe of both methods side by side (then their final test) took, worst "
                  f"of the two, {sizing['startup_s']:.0f} s to start (imports, cached data to the device, model), "
                  f"{sizing['epoch_s']:.1f} s per epoch (training + calibration + evaluation; the first epoch also "
                  f"compiles the fused kernels) and {sizing['finish_s']:.0f} s for the final test; with "
                  f"{sizing['left_s']:.0f} s left, E = {sizing['epochs']} epochs fit (10% slack). "
                  + ("The results below are the E-epoch runs (a fresh cosine schedule over E epochs)."
                     if rec.get("epochs", 1) >= 2 else "The results below are the probe's (1 epoch)."), ""]
    if results:
        any_r = next(iter(results.values()))
        c = any_r["config"]
        lines += [f"Config (resolved, from result.json): {c['model']['arch']}, data {c['data']['name']} "
                  f"({any_r.get('data_source', '')}), batch {c['data']['batch_size']}, augment "
                  f"{c['data']['augment']}, L={c['model']['L']}, lam_init={c['model']['lam_init']}, "
                  f"tau={c['noise']['tau']}, lr {c['train']['lr']} cosine over {c['train']['epochs']} epoch(s), "
                  f"device {c['train']['device']}, amp {c['train']['amp']}, channels_last "
                  f"{c['train']['channels_last']}, seed {c['train']['seed']}; the harness Loader holds the uint8 "
                  "images on the training device. Selection: " + any_r["protocol"]["selection"] + ".", "",
                  "One seed and a few epochs of the paper's 400: a smoke test of the GPU path and a timing, "
                  "not a measurement of the NQ − QCFS difference.", ""]
        Ts = sorted({int(t) for r in results.values() for t in r["snn_test_acc"]})
        head = ["method", "epochs", "best epoch", "ANN test"] + [f"SNN T={t}" for t in Ts]
        rows = []
        for prefix, _ in METHODS:
            r = results.get(prefix)
            if r:
                rows.append([r["method"], len(r["history"]), r["best_epoch"], f"{r['ann_test_acc']:.2f}"]
                            + [f"{r['snn_test_acc'][str(t)]:.2f}" if str(t) in r["snn_test_acc"] else "—" for t in Ts])
        if len(results) == 2:
            q, n = results["qcfs"], results["nq"]
            rows.append(["NQ − QCFS", "", "", f"{n['ann_test_acc'] - q['ann_test_acc']:+.2f}"]
                        + [f"{n['snn_test_acc'][str(t)] - q['snn_test_acc'][str(t)]:+.2f}"
                           if str(t) in n["snn_test_acc"] and str(t) in q["snn_test_acc"] else "—" for t in Ts])
        lines += ["Test accuracy (%) of the selected checkpoint:", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
        lines += ["", "Per epoch (s: training + calibration + evaluation; accuracies on the validation split):", "",
                  "| method | epoch | train loss | train s | epoch s | ANN val | SNN val T=sel |", "|---|---|---|---|---|---|---|"]
        for prefix, _ in METHODS:
            r = results.get(prefix)
            for h in (r or {}).get("history", []):
                lines.append(f"| {r['method']} | {h['epoch']} | {h['train_loss']:.4f} | {fmt(h['train_s'])} | "
                             f"{fmt(h['epoch_s'])} | {h.get('ann_val_acc', float('nan')):.2f} | "
                             f"{h.get('snn_sel_acc', float('nan')):.2f} |")
    if runs:
        stopped = [f"{k}: stopped after epoch {e['after_epoch']} of {e['of']}" for k, r in runs.items()
                   for e in r["events"] if e["kind"] == "stopped"]
        if stopped:
            lines += ["", "Stopped early to keep the budget (the cosine schedule did not reach 0; result.json's "
                      "protocol.extended_from_epochs holds the planned E): " + "; ".join(stopped) + "."]
    (outdir / "train_pair.md").write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- main

def write_summary(plan: Plan, outdir: Path, args, archive: Path | None) -> None:
    rows = ["| step | status | wall s | timeout s | note |", "|---|---|---|---|---|"]
    for s in plan.steps:
        tmo = f"{s['timeout_s']:.0f}" if s.get("timeout_s") is not None else "—"
        rows.append(f"| {s['step']} | {s['status']} | {s.get('wall_s', 0):.0f} | {tmo} | {s.get('why', '')} |")
    files = [f for f in FILES if (outdir / f).exists() or f == "summary.md"]
    note = ("Dry run: toy sizes on the CPU, synthetic data, HARNESS_FUSED=0 in every step (eager kernels, no "
            "torch.compile); it tests this script, and its timings mean nothing.\n\n" if args.dry_run else "")
    text = (f"# GPU check{' (dry run)' if args.dry_run else ''}\n\n{note}"
            f"Budget {plan.budget:.0f} s (steps end {MARGIN} s before it); used {plan.elapsed():.0f} s. "
            f"Archive: `{archive}`.\n\n" + "\n".join(rows)
            + "\n\nFiles: " + ", ".join(f"`{f}`" for f in files) + ".\n")
    (outdir / "summary.md").write_text(text)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    workers = {"--env-worker": env_worker, "--simulate-worker": simulate_worker,
               "--activation-worker": activation_worker, "--data-worker": data_worker,
               "--train-worker": train_worker}
    if argv and argv[0] in workers:
        workers[argv[0]](json.loads(argv[1]))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "reports" / "gpu"),
                   help="output folder (default: $OUT, else reports/gpu)")
    p.add_argument("--data", default=None, help=f"CIFAR-10 JPEG archive (default: $CIFAR_ARCHIVE, .data/{ARCHIVE}, "
                                                f"../shared/data/{ARCHIVE})")
    p.add_argument("--budget", type=float, default=None,
                   help=f"seconds for everything (default {DEFAULT_BUDGET}; dry run {DRY_BUDGET})")
    p.add_argument("--max-epochs", type=int, default=None, help=f"cap on the pair's epochs (default {MAX_EPOCHS}; dry run 2)")
    p.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU (tests this script)")
    p.add_argument("--skip", default="", help="comma-separated steps to leave out: env,simulate,activation,train")
    args = p.parse_args(argv)
    args.max_epochs = args.max_epochs or (2 if args.dry_run else MAX_EPOCHS)
    budget = args.budget or (DRY_BUDGET if args.dry_run else DEFAULT_BUDGET)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    for f in FILES:
        (outdir / f).unlink(missing_ok=True)
    plan = Plan(budget)
    log = Log(outdir / "log.txt")
    archive = archive_path(args.data)
    dry = args.dry_run
    ncpu = os.cpu_count() or 2
    log(f"gpu_check: out {outdir}, budget {budget:.0f} s, {'DRY RUN (CPU, toy sizes)' if dry else 'CUDA'}, "
        f"archive {archive}, python {sys.executable}")
    if not dry:
        try:
            import torch
            if not torch.cuda.is_available():
                log("gpu_check: torch.cuda.is_available() is False: nothing to do on this machine "
                    "(use --dry-run to test the script on a CPU)")
                write_summary(plan, outdir, args, archive)
                return 2
        except ImportError as e:
            log(f"gpu_check: cannot import torch ({e})")
            return 2
    reserve = 0 if dry or "train" in skip else TRAIN_RESERVE
    if dry:  # eager kernels in every step: no torch.compile, the dry run tests this script
        os.environ["HARNESS_FUSED"] = "0"
    dev = "cpu" if dry else "cuda"

    def step(name, group, cmd, cap, **kw):
        cap *= DRY_CAP_FACTOR if dry else 1  # a shared CPU can be many times slower than an idle one
        if group in skip:
            plan.steps.append(dict(step=name, status="skipped", why="--skip", wall_s=0.0))
            log(f"== {name}: SKIPPED (--skip {group})")
            return
        run_step(plan, log, name, cmd, cap, reserve=reserve, min_s=5 if dry else 20, **kw)

    step("env", "env", me("--env-worker", {"out": str(outdir / "gpu_env.txt"), "budget": budget, "dry_run": dry}), 30)
    sim = dict(quick=dry, threads=1 if dry else ncpu, reps=1 if dry else 5, batch=2 if dry else 256,
               out=str(outdir / "simulate.md"), device=dev)
    step("simulate fp32", "simulate", me("--simulate-worker", {
        **sim, "amp": False, "channels_last": False,
        "parts": ["speed", "roofline"] if dry else ["speed", "allT", "memory", "scaling", "roofline"]}), 100)
    step("simulate amp+channels_last", "simulate", me("--simulate-worker", {
        **sim, "amp": not dry, "channels_last": True,
        "parts": ["speed"] if dry else ["speed", "allT", "scaling", "roofline"]}), 80)
    act_md = outdir / "activation.md"
    if "activation" not in skip:
        act_md.write_text("## Activation (benchmarks/activation.py, as it is: on the host CPU)\n\n"
                          + ACTIVATION_CUDA_NEEDS.split(" The section below")[0] + " Its CPU run on this host:\n\n")
    step("activation cpu (activation.py as is)", "activation",
         # --quick: its CPU figures are not what this run is for, and they must not eat the budget
         [sys.executable, "benchmarks/activation.py", "--quick", "--threads", str(1 if dry else ncpu)],
         45, stdout_to=act_md)
    step("activation cuda", "activation", me("--activation-worker", {
        "out": str(act_md), "device": dev, "batch": 4 if dry else 128, "steps": 1 if dry else 5,
        "reps": 1 if dry else 5, "settings": [[False, False]] + ([] if dry else [[True, True]])}), 60)
    if "train" in skip:
        plan.steps.append(dict(step="train pair", status="skipped", why="--skip", wall_s=0.0))
        log("== train pair: SKIPPED (--skip train)")
    else:
        train_pair(plan, log, args, outdir, archive)
    write_summary(plan, outdir, args, archive)
    log(f"gpu_check: done in {plan.elapsed():.0f} s; files: "
        + ", ".join(sorted(f.name for f in outdir.iterdir())))
    for s in plan.steps:
        log(f"   {s['step']}: {s['status']}" + (f" ({s['why']})" if s.get("why") else ""))
    return 1 if any(s["status"] in ("failed", "timed out") for s in plan.steps) else 0


if __name__ == "__main__":
    sys.exit(main())
