"""The calibration actor's logic as a plain class (no Ray): same delta as local
calibration, history in epoch order through a retried epoch, a restart and a resume,
per-call queue / compute times, and the trial-side handle's retries."""
import threading
import time

import pytest
import torch
from torch import nn

import harness
from harness.actor import ActorCalibrator, CalibrationActor, History, data_key, model_spec
from harness.calibration import LocalCalibrator


@pytest.fixture(scope="module")
def setup():
    from harness.config import load_config
    from harness.data import CalibrationSet, load_dataset

    cfg = load_config(None, ["noise.calib_samples=60", "train.seed=3"])
    data = load_dataset(cfg.data, 3)
    local = LocalCalibrator(CalibrationSet.from_dataset(data, cfg.resolved(data.image_size)), 32)
    return cfg, local


def _model(seed: int):
    torch.manual_seed(seed)
    model = harness.create_model("cnn_small", num_classes=10, in_chans=1, lam_init=1.5).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
    return model


def _call(actor, cfg, model, epoch, trial="t", submitted=None):
    return actor.calibrate(model_spec(cfg, 10, 1), model.state_dict(), 4, data_key(cfg), trial, epoch, 32, submitted)


@pytest.mark.parametrize("augment", [False, True])
def test_actor_and_local_calibrator_give_the_same_delta(augment):
    """The shared actor and the in-process calibrator draw the same stratified subset (and
    the same augmentation for the same epoch): same statistics, and the history holds
    the same deltas."""
    from harness.config import load_config
    from harness.data import CalibrationSet, load_dataset

    cfg = load_config(None, ["noise.calib_samples=100", "train.seed=3", f"noise.calib_augment={str(augment).lower()}"])
    data = load_dataset(cfg.data, 3)
    model = _model(4)
    local = LocalCalibrator(CalibrationSet.from_dataset(data, cfg.resolved(data.image_size)), 64)
    actor = CalibrationActor({data_key(cfg): cfg.to_dict()})
    assert actor.ready()["splits"][data_key(cfg)]["class_counts"] == local.calib_set.class_counts()
    for epoch in (1, 2):
        a = actor.calibrate(model_spec(cfg, 10, 1), model.state_dict(), 4, data_key(cfg), "t", epoch, 64)
        b = local.calibrate(model, tau=4, trial_id="t", epoch=epoch)
        assert a["std"] == b.std and a["mean"] == b.mean and a["n_images"] == b.n_images == 100
        assert set(a["timing"]) == {"queue_s", "compute_s"} and a["timing"]["compute_s"] > 0
    h = actor.history("t")
    assert [e["epoch"] for e in h] == [1, 2]
    assert h[1]["delta"]["end_to_end"] == b.delta("end_to_end")
    assert h[1]["compute_s"] > 0 and h[1]["queue_s"] >= 0


def test_history_order_survives_a_retried_epoch(setup, tmp_path):
    """A retried epoch (the trial restarted from an older checkpoint, or the call was
    re-sent) replaces that epoch's entry; the history stays in epoch order, final last."""
    cfg, local = setup
    actor = CalibrationActor({data_key(cfg): cfg.to_dict()}, history_dir=str(tmp_path / "h"))
    _call(actor, cfg, _model(1), 1)
    _call(actor, cfg, _model(1), 2)
    _call(actor, cfg, _model(1), None)  # a final calibration from an earlier attempt
    _call(actor, cfg, _model(1), 3)
    retried = _model(2)
    _call(actor, cfg, retried, 2)  # epoch 2 again, with other weights
    h = actor.history("t")
    assert [e["epoch"] for e in h] == [1, 2, 3, None]
    assert h[1]["std"] == local.calibrate(retried, tau=4, epoch=2).std
    assert actor.trials() == ["t"] and actor.all_histories() == {"t": h}


def test_history_survives_a_restart_and_a_resume(setup, tmp_path):
    """Ray restarts a dead actor by running __init__ again; --resume creates it anew: both
    reload the calibration split and the persisted history, and new epochs append to it."""
    cfg, _ = setup
    folder = str(tmp_path / "calibration_history")
    first = CalibrationActor({data_key(cfg): cfg.to_dict()}, history_dir=folder)
    for epoch in (1, 2):
        _call(first, cfg, _model(1), epoch, trial="a")
    _call(first, cfg, _model(1), 1, trial="b/with odd:chars")
    before = first.all_histories()
    del first  # the process died

    again = CalibrationActor({data_key(cfg): cfg.to_dict()}, history_dir=folder)
    assert again.ready()["history_trials"] == ["a", "b/with odd:chars"]
    assert again.all_histories() == before
    _call(again, cfg, _model(1), 3, trial="a")
    _call(again, cfg, _model(1), None, trial="a")
    assert [e["epoch"] for e in again.history("a")] == [1, 2, 3, None]
    third = CalibrationActor({data_key(cfg): cfg.to_dict()}, history_dir=folder)
    assert third.all_histories() == again.all_histories()
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave no temporary files


def test_history_ignores_foreign_files(tmp_path):
    (tmp_path / "notes.json").write_text("[1, 2]")
    (tmp_path / "broken.json").write_text("{")
    h = History(tmp_path)
    assert h.trials() == []
    h.put("t", 1, {"epoch": 1})
    assert History(tmp_path).get("t") == [{"epoch": 1}]


def test_concurrent_calls_queue_for_a_compute_slot(setup):
    """With one compute slot, two calls sent at once run one after the other: the second
    one's queueing time covers the first one's computation. With two slots, neither waits
    for the other."""
    cfg, _ = setup
    model = _model(1)
    for slots in (1, 2):
        actor = CalibrationActor({data_key(cfg): cfg.to_dict()}, slots=slots)
        _call(actor, cfg, model, 1)  # warm-up (kernel compilation)
        replies = []
        sent = time.time()
        threads = [threading.Thread(target=lambda e=e: replies.append(_call(actor, cfg, model, e, submitted=sent)))
                   for e in (2, 3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        timings = sorted((r["timing"] for r in replies), key=lambda t: t["queue_s"])
        if slots == 1:
            assert timings[1]["queue_s"] >= timings[0]["compute_s"]
        else:
            assert timings[1]["queue_s"] < timings[0]["compute_s"]
        assert [e["epoch"] for e in actor.history("t")] == [1, 2, 3]



def test_a_conversion_beside_a_calibration_in_another_thread():
    """torch.fx tracing (every to_snn) patches nn.Module.__call__ for the whole process:
    a calibration computing in another thread of the actor failed with "module is not
    installed as a submodule" (first seen with 2 compute slots under load). Thread A is
    inside a forward pass when thread B starts converting a model whose trace takes a
    while; both must succeed, and A's statistics equal those of the same calibration
    run alone."""
    from harness.calibration import residual_error
    from harness.convert import to_snn

    torch.manual_seed(0)
    x = torch.rand(48, 1, 8, 8)
    model_a = _model(1)
    alone = residual_error(model_a, x, 4, batch_size=16, histograms=False)
    a_inside, b_tracing = threading.Event(), threading.Event()

    class SlowToTrace(nn.Module):       # its forward runs (on proxies) during the trace
        def __init__(self):
            super().__init__()
            self.inner = _model(2)

        def forward(self, x):
            b_tracing.set()
            time.sleep(0.3)             # A's forward pass goes on meanwhile, unless guarded
            return self.inner(x)

    def hold(module, inputs):           # A, in its first batch's ANN forward pass
        if not a_inside.is_set():
            a_inside.set()
            b_tracing.wait(1.0)         # unguarded, B is tracing when A goes on
    conv = next(m for m in model_a.modules() if isinstance(m, nn.Conv2d))
    hook = conv.register_forward_pre_hook(hold)
    out, errors = {}, []

    def run_a():
        try:
            out["a"] = residual_error(model_a, x, 4, batch_size=16, histograms=False)
        except Exception as e:          # noqa: BLE001
            errors.append(e)

    def run_b():
        a_inside.wait(5)
        try:
            out["b"] = to_snn(SlowToTrace().eval())
        except Exception as e:          # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=run_a), threading.Thread(target=run_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    hook.remove()
    assert not errors, errors
    assert out["a"].std == alone.std and out["a"].mean == alone.mean
    assert len(out["b"].neurons) == len(to_snn(_model(2)).neurons)


class FakeActorError(Exception):
    pass


class FakeHandle:
    """A stand-in for the Ray actor handle: a plain CalibrationActor behind a call that
    fails `fail` times first (as a call to a dying actor does)."""

    def __init__(self, actor, fail: int, error=FakeActorError):
        self.actor, self.fail, self.error, self.calls = actor, fail, error, 0

    def call(self, handle, *args):
        assert handle is self
        self.calls += 1
        if self.fail:
            self.fail -= 1
            raise self.error("The actor died unexpectedly before finishing this task.")
        return self.actor.calibrate(*args)


def test_retrying_handle_survives_one_actor_error(setup):
    cfg, local = setup
    actor = CalibrationActor({data_key(cfg): cfg.to_dict()})
    fake = FakeHandle(actor, fail=1)
    connects = []
    cal = ActorCalibrator("n", data_key(cfg), model_spec(cfg, 10, 1), 32, backoff=0.0,
                          connect=lambda name: connects.append(name) or fake, call=fake.call,
                          retry_on=(FakeActorError,))
    model = _model(1)
    stats = cal.calibrate(model, tau=4, trial_id="t", epoch=1)
    assert stats.std == local.calibrate(model, tau=4, epoch=1).std
    assert fake.calls == 2 and connects == ["n", "n"]  # the handle is looked up again after the error
    t = cal.timing(1)
    assert t["attempts"] == 2 and t["compute_s"] > 0 and t["queue_s"] >= 0 and t["round_trip_s"] >= t["compute_s"]
    assert [e["epoch"] for e in actor.history("t")] == [1]


def test_retrying_handle_with_a_real_ray_actor_error(setup):
    """The default retry condition is Ray's RayActorError (ray is imported, not started)."""
    from ray.exceptions import ActorDiedError, RayActorError
    cfg, _ = setup
    actor = CalibrationActor({data_key(cfg): cfg.to_dict()})
    for err in (RayActorError, ActorDiedError):
        fake = FakeHandle(actor, fail=1, error=lambda msg, err=err: err(error_msg=msg) if err is RayActorError
                          else err())
        cal = ActorCalibrator("n", data_key(cfg), model_spec(cfg, 10, 1), 32, backoff=0.0,
                              connect=lambda name, fake=fake: fake, call=fake.call)
        cal.calibrate(_model(1), tau=4, trial_id="t", epoch=1)
        assert fake.calls == 2


def test_retrying_handle_gives_up(setup):
    cfg, _ = setup
    actor = CalibrationActor({data_key(cfg): cfg.to_dict()})
    fake = FakeHandle(actor, fail=10)
    cal = ActorCalibrator("n", data_key(cfg), model_spec(cfg, 10, 1), 32, retries=2, backoff=0.0,
                          connect=lambda name: fake, call=fake.call, retry_on=(FakeActorError,))
    with pytest.raises(FakeActorError):
        cal.calibrate(_model(1), tau=4, epoch=1)
    assert fake.calls == 3
    # a ValueError that is not about a missing actor is not retried
    bad = FakeHandle(actor, fail=1, error=lambda msg: ValueError("bad state dict"))
    cal = ActorCalibrator("n", data_key(cfg), model_spec(cfg, 10, 1), 32, backoff=0.0,
                          connect=lambda name: bad, call=bad.call, retry_on=(FakeActorError,))
    with pytest.raises(ValueError, match="bad state dict"):
        cal.calibrate(_model(1), tau=4, epoch=1)
    assert bad.calls == 1


@pytest.mark.slow
def test_ray_actor_restarts_with_its_data_and_history(setup, tmp_path):
    """The real thing: the actor's process is killed with a call in flight; Ray restarts
    it (data and history reloaded in __init__) and retries the call; the history keeps
    every epoch."""
    import os
    import signal

    ray = pytest.importorskip("ray")
    from harness.actor import start_actor
    cfg, local = setup
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             runtime_env={"env_vars": {k: os.environ[k] for k in ("TORCHINDUCTOR_CACHE_DIR", "HARNESS_CACHE",
                                                                    "PYTHONPATH") if k in os.environ}})
    try:
        name = "harness-calibrator-test-restart"
        handle, ready = start_actor(name, {data_key(cfg): cfg.to_dict()}, max_concurrency=1,
                                    history_dir=tmp_path / "h")
        assert ready["history_trials"] == []
        cal = ActorCalibrator(name, data_key(cfg), model_spec(cfg, 10, 1), 32, backoff=0.2)
        model = _model(1)
        cal.calibrate(model, tau=4, trial_id="t", epoch=1)
        pid = ray.get(handle.pid.remote())
        state = {k: v.detach() for k, v in model.state_dict().items()}
        ref = handle.calibrate.remote(model_spec(cfg, 10, 1), state, 4, data_key(cfg), "t", 2, 32, time.time())
        os.kill(pid, signal.SIGKILL)
        reply = ray.get(ref, timeout=300)  # retried on the restarted actor
        assert reply["std"] == local.calibrate(model, tau=4, epoch=2).std
        cal.calibrate(model, tau=4, trial_id="t", epoch=3)
        assert ray.get(handle.pid.remote()) != pid
        assert [e["epoch"] for e in ray.get(handle.history.remote("t"))] == [1, 2, 3]
        assert ray.get(handle.ready.remote())["history_trials"] == ["t"]
    finally:
        ray.shutdown()


def test_per_call_timings_are_mlflow_epoch_metrics():
    from harness.tracking import epoch_metrics
    m = epoch_metrics({"epoch": 3, "calib_s": 2.5, "calib_queue_s": 0.5, "calib_compute_s": 1.75}, [])
    assert m == {"time/calib_s": 2.5, "calib/queue_s": 0.5, "calib/compute_s": 1.75}
    assert "calib/queue_s" not in epoch_metrics({"epoch": 3, "calib_queue_s": None}, [])  # local calibration
