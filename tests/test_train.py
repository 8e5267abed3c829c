"""The shared training loop: resume after interruption, SIGTERM, determinism, early stopping."""

import os
import signal

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from hemocam.train import EpochSampler, TrainingInterrupted, available_cpus, fit, make_loader, seed_everything


class Toy(Dataset):
    """Items ``(index, seed)`` from EpochSampler; the seed drives a per-sample 'augmentation'."""

    def __init__(self, n=48):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 6, generator=g)
        self.y = (self.x[:, 0] + 0.5 * self.x[:, 1] > 0).float()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, item):
        i, seed = item if isinstance(item, tuple) else (item, 0)
        noise = torch.randn(6, generator=torch.Generator().manual_seed(seed)) * 0.1
        return self.x[i] + noise, self.y[i]


class Run:
    def __init__(self, kill_at=None, crash_at=None, scores=None):
        self.calls, self.kill_at, self.crash_at, self.scores = 0, kill_at, crash_at, scores

    def loss(self, model, batch, device):
        self.calls += 1
        if self.calls == self.kill_at:
            os.kill(os.getpid(), signal.SIGTERM)
        if self.calls == self.crash_at:
            raise KeyboardInterrupt("simulated SIGKILL: the process dies mid-epoch")
        x, y = batch
        return torch.nn.functional.binary_cross_entropy_with_logits(model(x.to(device))[:, 0], y.to(device))

    def evaluate(self, model, loader, device):
        if self.scores is not None:
            e = len(self.seen) if hasattr(self, "seen") else 0
            self.seen = getattr(self, "seen", []) + [e]
            return self.scores[e], {"acc": 0.0}
        acc = torch.cat([((model(x)[:, 0] > 0).float() == y).float() for x, y in loader]).mean()
        return float(acc), {"acc": float(acc)}


def train(ckpt, run, epochs=4, workers=0, seed=0, patience=10, keep_last=False):
    seed_everything(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Dropout(0.2), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    ds = Toy()
    tl = make_loader(ds, 8, True, workers, seed, "cpu", sampler=EpochSampler(len(ds), True, seed))
    vl = make_loader(ds, 16, False, 0, seed, "cpu")
    res = fit(model, tl, vl, loss_fn=run.loss, evaluate_fn=run.evaluate, ckpt_dir=ckpt, epochs=epochs, lr=1e-2,
              weight_decay=1e-4, patience=patience, amp=True, seed=seed, device="cpu", progress=False,
              keep_last=keep_last)
    return res, model


def _losses(res):
    return [round(h["train_loss"], 7) for h in res["history"]]


@pytest.mark.parametrize("workers", [0, 1])
def test_sigterm_then_resume_equals_uninterrupted(tmp_path, workers):
    ref, ref_model = train(tmp_path / "ref", Run(), workers=workers)
    assert [h["epoch"] for h in ref["history"]] == [1, 2, 3, 4]
    with pytest.raises(TrainingInterrupted) as exc:
        train(tmp_path / "b", Run(kill_at=6 * 2 + 3), workers=workers)  # 6 batches/epoch: dies in epoch 3
    assert exc.value.code == 143
    ck = torch.load(tmp_path / "b" / "last.pt", weights_only=False)
    assert ck["epoch"] == 2 and len(ck["history"]) == 2
    res, model = train(tmp_path / "b", Run(), workers=workers)
    assert [h["epoch"] for h in res["history"]] == [1, 2, 3, 4]
    assert _losses(res) == _losses(ref)
    for a, b in zip(model.state_dict().values(), ref_model.state_dict().values()):
        assert torch.equal(a, b)


def test_crash_without_warning_loses_at_most_the_running_epoch(tmp_path):
    ref, _ = train(tmp_path / "ref", Run())
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "c", Run(crash_at=6 * 3 + 2))  # dies inside epoch 4
    assert torch.load(tmp_path / "c" / "last.pt", weights_only=False)["epoch"] == 3
    run = Run()
    res, _ = train(tmp_path / "c", run)
    assert run.calls == 6  # only epoch 4 is trained again
    assert _losses(res) == _losses(ref)


def test_deterministic_from_seed(tmp_path):
    a, ma = train(tmp_path / "a", Run(), epochs=2, seed=5)
    b, mb = train(tmp_path / "b", Run(), epochs=2, seed=5)
    c, _ = train(tmp_path / "c", Run(), epochs=2, seed=6)
    assert _losses(a) == _losses(b) and _losses(a) != _losses(c)
    assert all(torch.equal(x, y) for x, y in zip(ma.state_dict().values(), mb.state_dict().values()))


def test_early_stopping_keeps_best_and_is_final(tmp_path):
    run = Run(scores=[0.5, 0.9, 0.8, 0.7, 0.95, 0.99])
    res, model = train(tmp_path / "e", run, epochs=6, patience=2)
    assert [h["epoch"] for h in res["history"]] == [1, 2, 3, 4]
    assert res["best_epoch"] == 2 and res["best_score"] == 0.9 and res["stopped_early"]
    best = torch.load(tmp_path / "e" / "best.pt", weights_only=True)
    assert best["epoch"] == 2
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), best["model"].values()))
    again = Run()
    res2, _ = train(tmp_path / "e", again, epochs=6, patience=2)
    assert again.calls == 0 and res2["best_epoch"] == 2 and len(res2["history"]) == 4


def test_keep_last_validates_every_epoch_but_keeps_the_last(tmp_path):
    run = Run(scores=[0.9, 0.5, 0.4, 0.3])
    res, model = train(tmp_path / "k", run, epochs=4, patience=1, keep_last=True)
    assert [h["val_score"] for h in res["history"]] == [0.9, 0.5, 0.4, 0.3]  # recorded, never stops early
    assert res["best_epoch"] == 4 and not res["stopped_early"]
    last = torch.load(tmp_path / "k" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), last.values()))


def test_without_validation_the_last_epoch_is_kept(tmp_path):
    class Rising(Run):  # the training loss rises after epoch 1: the lowest is not the last
        def loss(self, model, batch, device):
            return super().loss(model, batch, device) + 0.1 * (self.calls // 6)

    seed_everything(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    ds = Toy()
    tl = make_loader(ds, 8, True, 0, 0, "cpu", sampler=EpochSampler(len(ds), True, 0))
    res = fit(model, tl, None, loss_fn=Rising().loss, evaluate_fn=None, ckpt_dir=tmp_path / "n", epochs=3, lr=1e-2,
              weight_decay=0.0, patience=1, amp=False, seed=0, device="cpu", progress=False)
    losses = [h["train_loss"] for h in res["history"]]
    assert losses[0] < losses[-1] and res["best_epoch"] == 3 and not res["stopped_early"]
    last = torch.load(tmp_path / "n" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), last.values()))


def test_loader_and_sampler():
    ds = Toy(10)
    dl = make_loader(ds, 4, True, 64, 0, "cpu")
    assert dl.num_workers <= available_cpus() and not dl.pin_memory
    s = EpochSampler(10, True, seed=3)
    s.set_epoch(1)
    e1 = list(s)
    assert list(s) == e1 and sorted(i for i, _ in e1) == list(range(10))
    s.set_epoch(2)
    assert list(s) != e1
    assert len({seed for _, seed in e1}) == 10
    w = EpochSampler(10, seed=0, weights=[1] + [0] * 9, num_samples=5)
    assert [i for i, _ in w] == [0] * 5
    with pytest.raises(ValueError):
        EpochSampler(3, weights=[0, 0, 0])


def test_checkpoint_resumes_only_the_run_that_wrote_it(tmp_path):
    def keyed(key, run, epochs=4):
        seed_everything(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
        ds = Toy()
        tl = make_loader(ds, 8, True, 0, 0, "cpu", sampler=EpochSampler(len(ds), True, 0))
        return fit(model, tl, make_loader(ds, 16, False, 0, 0, "cpu"), loss_fn=run.loss, evaluate_fn=run.evaluate,
                   ckpt_dir=tmp_path / "k", epochs=epochs, lr=1e-2, weight_decay=0, patience=10, amp=False, seed=0,
                   device="cpu", progress=False, run_key=key)

    first = keyed("a", Run())
    again = Run()
    keyed("a", again)
    assert again.calls == 0  # same run, finished: nothing to do
    other = Run()
    res = keyed("b", other)  # settings or inputs changed: the old weights are not reused
    assert other.calls == 4 * 6 and [h["epoch"] for h in res["history"]] == [1, 2, 3, 4]
    assert _losses(res) == _losses(first)  # a fresh start (same seed, same data here)
    assert torch.load(tmp_path / "k" / "last.pt", weights_only=False)["run_key"] == "b"
    more = Run()
    keyed("b", more, epochs=5)  # a raised epoch budget continues the same run
    assert more.calls == 6
    # an upgrade that changes what the key holds: the key the old version computed still counts,
    # and the checkpoint goes on under the new one
    upgraded = Run()
    keyed(("c", "b"), upgraded, epochs=6)
    assert upgraded.calls == 6
    assert torch.load(tmp_path / "k" / "last.pt", weights_only=False)["run_key"] == "c"


def test_file_fingerprint_follows_content_not_time(tmp_path):
    from hemocam.train import file_fingerprint, run_key

    small, big = tmp_path / "a.json", tmp_path / "c.npy"
    small.write_bytes(b"x" * 100)
    data = np.random.default_rng(0).integers(0, 255, 3 << 20, dtype=np.uint8)
    big.write_bytes(data.tobytes())
    before = (file_fingerprint(small), file_fingerprint(big), run_key({"a": 1}, [small, big]))
    for f in (small, big):  # rewritten with the same bytes later
        f.write_bytes(f.read_bytes())
        os.utime(f, ns=(1, 10**18))
    assert (file_fingerprint(small), file_fingerprint(big), run_key({"a": 1}, [small, big])) == before
    assert run_key({"a": 1}, [small, big], content=False) != before[2]  # the old key: mtimes
    small.write_bytes(b"y" + b"x" * 99)
    data[len(data) * 5 // 8 + 10] ^= 1  # inside a sampled block of a large file
    big.write_bytes(data.tobytes())
    assert file_fingerprint(small) != before[0] and file_fingerprint(big) != before[1]


def test_run_key_follows_settings_and_inputs(tmp_path):
    from hemocam.train import run_key

    f = tmp_path / "cache.npy"
    f.write_bytes(b"x" * 10)
    base = run_key({"lr": 1e-3, "epochs": 5}, [f])
    assert run_key({"lr": 1e-3, "epochs": 9, "num_workers": 4}, [f]) == base  # budget and workers left out
    assert run_key({"lr": 2e-3, "epochs": 5}, [f]) != base
    f.write_bytes(b"y" * 11)  # a regenerated input
    assert run_key({"lr": 1e-3, "epochs": 5}, [f]) != base
