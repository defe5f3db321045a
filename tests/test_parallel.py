"""Checkpoints move between layouts: a whole (DDP) checkpoint resumes a sharded (FSDP) model
and a sharded one a whole model, each continuing exactly as the run that wrote it; one
process reads a sharded checkpoint's weights. A one-rank gloo group in this process (the
two-rank runs under Ray Train are in test_train.py)."""

import copy
import json

import pytest
import torch

from ldmflow.model import unets
from ldmflow.training import checkpoints, diffusion, parallel


@pytest.fixture
def process_group():
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def fresh(strategy: str | None):
    """A tiny UNet, its EMA, AdamW and an LR schedule; sharded for ``fsdp``, whole otherwise."""
    torch.manual_seed(0)
    model = unets.build("tiny", "class", (4, 8, 8), 10)
    ema = copy.deepcopy(model).requires_grad_(False)
    if strategy == "fsdp":
        parallel.prepare(model, ema, "fsdp", torch.device("cpu"), world=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: diffusion.lr_factor(s, 2, 10))
    return dict(modules={"unet": model, "ema": ema}, optimizers={"optimizer": (model, optimizer)},
                schedules={"lr_schedule": schedule})


def steps(state, count: int, seed: int) -> list[float]:
    model, ema = state["modules"]["unet"], state["modules"]["ema"]
    _, optimizer = state["optimizers"]["optimizer"]
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(count):
        x = torch.randn(4, 4, 8, 8, generator=generator)
        t = torch.randint(0, 1000, (4,), generator=generator)
        labels = torch.randint(0, 11, (4,), generator=generator)
        loss = model(x, t, class_labels=labels, return_dict=False)[0].pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        state["schedules"]["lr_schedule"].step()
        diffusion.ema_update(list(ema.parameters()), list(model.parameters()), step, 0.9, 2)
        losses.append(loss.item())
    return losses


def save(state, folder, sharded: bool) -> None:
    folder.mkdir()
    if sharded:
        checkpoints.save_sharded(folder, 0, **state, state={"step": 3})
    else:
        optimizers = {name: opt for name, (_, opt) in state["optimizers"].items()}
        checkpoints.save(folder, modules=state["modules"], optimizers=optimizers | state["schedules"], state={"step": 3})


def build():
    return unets.build("tiny", "class", (4, 8, 8), 10)


@pytest.mark.parametrize("written, read", [("ddp", "fsdp"), ("fsdp", "ddp"), ("fsdp", "fsdp")])
def test_a_checkpoint_resumes_exactly_in_another_layout(process_group, tmp_path, written, read):
    writer = fresh(written)
    steps(writer, 3, seed=1)
    save(writer, tmp_path / "checkpoint", sharded=written == "fsdp")
    ema_saved = parallel.cpu_copy(writer["modules"]["ema"], 0, build)
    expected = steps(writer, 2, seed=2)

    reader = fresh(read)
    assert checkpoints.load_training(tmp_path / "checkpoint", **reader) == {"step": 3}
    assert steps(reader, 2, seed=2) == pytest.approx(expected, rel=1e-6)

    ema = checkpoints.load_weights(tmp_path / "checkpoint", "ema", build())  # the driver's read, in one process
    for key, value in ema_saved.state_dict().items():
        assert torch.equal(ema.state_dict()[key], value), key


def test_a_checkpoint_of_another_format_version_is_refused_before_it_is_read(process_group, tmp_path):
    writer = fresh("ddp")
    save(writer, tmp_path / "checkpoint", sharded=False)
    state_file = tmp_path / "checkpoint" / checkpoints.STATE
    assert json.loads(state_file.read_text())["version"] == checkpoints.VERSION
    state_file.write_text(json.dumps({"step": 3}))  # as written before checkpoints had a version
    reader = fresh("ddp")
    before = {k: v.clone() for k, v in reader["modules"]["unet"].state_dict().items()}
    with pytest.raises(checkpoints.CheckpointError, match="format version 0 is older than this ldmflow's"):
        checkpoints.load_training(tmp_path / "checkpoint", **reader)
    with pytest.raises(checkpoints.CheckpointError, match="start the run afresh"):
        checkpoints.load_weights(tmp_path / "checkpoint", "ema", build())
    for name, value in reader["modules"]["unet"].state_dict().items():
        assert torch.equal(value, before[name])
