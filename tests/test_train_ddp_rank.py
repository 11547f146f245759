"""training/train.py under torchrun, seen from rank 0 of two: the model is DDP-wrapped, the loss
gathers the global batch, every rank's RNG state goes into the checkpoint.

One process plays rank 0 of a 2-process run: a 1-process gloo group carries DDP and the loss's
all-gather, and the Dist's all_gather returns a second rank's RNG state (the real 2-process run is
tests/test_training_ddp.py, too slow for the mutation selection)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as tdist
import transformers.models.bert.modeling_bert  # noqa: F401  (imported at collection, not per test)
from torch.nn.parallel import DistributedDataParallel

import training.train as tt
from _train_data import cfg, make_data
from training.checkpoints import load_training_state
from training.distributed import Dist

# transformers' own progress bars off while these tests load the tiny text tower (as quiet fits do)
pytestmark = pytest.mark.usefixtures("hf_bars_off")


class Rank0Of2(Dist):
    def __init__(self):
        super().__init__()
        self.rank, self.world, self.local_rank = 0, 2, 0

    def all_gather(self, obj):
        other = dict(obj, torch=torch.zeros_like(obj["torch"]))  # rank 1's state differs
        return [obj, other]


@pytest.fixture()
def group(tmp_path):
    if tdist.is_initialized():
        pytest.skip("a process group is already running")
    tdist.init_process_group("gloo", store=tdist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    tdist.destroy_process_group()


def test_rank0_of_two_wraps_ddp_gathers_the_loss_and_saves_every_rank_rng(monkeypatch, tmp_path, tiny_bert_dir,
                                                                            group):
    import napari_cellclip.losses as losses

    calls = []
    real = losses.compute_loss

    def spy(*a, **kw):
        calls.append(kw)
        return real(*a, **kw)

    monkeypatch.setattr(losses, "compute_loss", spy)
    import napari_cellclip.devices as devices

    sent = []
    real_to = devices.to_device
    monkeypatch.setattr(devices, "to_device", lambda t, device: sent.append(device) or real_to(t, device))
    data = make_data()
    run = tt.setup(cfg(tmp_path, tiny_bert_dir, batch_size=2, save_every=1), data, Rank0Of2(), torch.device("cpu"),
                   lambda *m: None)
    assert isinstance(run.net, DistributedDataParallel) and run.net.module is run.model
    assert run.sampler.world_size == 2 and run.sampler.rank == 0 and run.train_args["world_size"] == 2
    rows = next(iter(run.sampler))
    assert len(rows) == 2  # this rank's half of a global batch of 4
    tt.train_step(run, rows)
    assert calls[-1]["gather"] is True and calls[-1]["labels"].tolist() == run.data.train.prompt_ids[rows].tolist()
    # the labels are all-gathered with the embeddings: they go to the device too (4 inputs, not 3)
    assert len(sent) == 4 and all(d is run.device for d in sent)
    run.step = 1
    tt._start_logs(run)
    tt.checkpoint(run)
    st = load_training_state(tmp_path / "checkpoints" / "checkpoint-0000001")
    assert st["world_size"] == 2 and len(st["rank_rng"]) == 2
    assert torch.equal(st["rank_rng"][0]["torch"], st["rng"]["torch"]) and not st["rank_rng"][1]["torch"].any()


def test_a_single_process_is_not_wrapped_and_does_not_gather(monkeypatch, tmp_path, tiny_bert_dir):
    import napari_cellclip.losses as losses

    calls = []
    real = losses.compute_loss
    monkeypatch.setattr(losses, "compute_loss", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    run = tt.setup(cfg(tmp_path, tiny_bert_dir), make_data(), Dist(), torch.device("cpu"), lambda *m: None)
    assert run.net is run.model
    tt.train_step(run, next(iter(run.sampler)))
    assert calls[-1]["gather"] is False and calls[-1]["labels"].device.type == "cpu"


def test_a_fit_as_rank0_of_two_joins_the_group_with_the_timeout_and_leaves_it(monkeypatch, tmp_path,
                                                                              tiny_bert_dir):
    import datetime

    from _train_data import fit

    if tdist.is_initialized():
        pytest.skip("a process group is already running")
    joined = []

    def init_process_group(**kw):  # the real group has one process here
        joined.append(kw)
        tdist.init_process_group.__wrapped_real__("gloo", store=tdist.FileStore(str(tmp_path / "store"), 1),
                                                  rank=0, world_size=1)

    init_process_group.__wrapped_real__ = tdist.init_process_group
    monkeypatch.setattr(tdist, "init_process_group", init_process_group)
    monkeypatch.setattr(tt, "Dist", Rank0Of2)
    out = tmp_path / "run"
    s = fit(monkeypatch, make_data(), cfg(out, tiny_bert_dir, epochs=1, dist_timeout=7))
    assert joined == [{"backend": "gloo", "timeout": datetime.timedelta(minutes=7)}]
    assert not tdist.is_initialized()  # left at the end
    assert s["world_size"] == 2 and s["batch_size"] == 3 and s["steps_per_epoch"] == 1  # global batch of 6
    assert len(load_training_state(out / "checkpoints" / "checkpoint-0000001")["rank_rng"]) == 2


def test_rank1_of_two_takes_the_second_half_of_each_global_batch(tmp_path, tiny_bert_dir, group):
    class Rank1Of2(Rank0Of2):
        def __init__(self):
            super().__init__()
            self.rank = 1

    from training.data import ShuffledBatchSampler

    data = make_data()
    run = tt.setup(cfg(tmp_path, tiny_bert_dir, batch_size=2), data, Rank1Of2(), torch.device("cpu"), lambda *m: None)
    glob = ShuffledBatchSampler(data.train.prompt_ids, 2, seed=3, rank=0, world_size=2).global_batches(0)
    # global batches of 3 wells padded to 4 by repeating their own: rank 1 takes places 2 and 3
    assert [b.tolist() for b in run.sampler] == [np.resize(g, 4)[2:].tolist() for g in glob]
