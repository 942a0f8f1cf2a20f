"""Structured pruning, Trainer-free: groups, physical shrink, config fields, optimizer state, depth."""

from __future__ import annotations

import copy

import pytest
import torch
from lightning.pytorch.demos import Transformer as DemoTransformer
from torch import nn

from lightning_green.pruning import StructuredPruner, kept_units, linear_flops_per_token, reshape_to_state_dict
from lightning_green.pruning.step_energy import PruningEnergy, StepEnergyWindows, TrainingEnergy

litgpt = pytest.importorskip("litgpt")
from litgpt.model import GPT  # noqa: E402

VOCAB = 64


def neox_config(n_layer: int = 2) -> litgpt.Config:
    return litgpt.Config(
        n_layer=n_layer,
        n_embd=64,
        n_head=4,
        block_size=32,
        vocab_size=VOCAB,
        padded_vocab_size=VOCAB,
        intermediate_size=128,
        bias=True,
    )


def llama_config(n_layer: int = 2) -> litgpt.Config:
    return litgpt.Config(
        n_layer=n_layer,
        n_embd=64,
        n_head=8,
        n_query_groups=4,
        block_size=32,
        vocab_size=VOCAB,
        padded_vocab_size=VOCAB,
        intermediate_size=96,
        mlp_class_name="LLaMAMLP",
        norm_class_name="RMSNorm",
        bias=False,
        parallel_residual=False,
        rotary_percentage=1.0,
    )


def tokens(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def adam_stepped(model: nn.Module, x: torch.Tensor) -> torch.optim.Optimizer:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):
        optimizer.zero_grad()
        model(x).float().pow(2).mean().backward()
        optimizer.step()
    return optimizer


def assert_kv_cache_decode_matches(model: GPT, x: torch.Tensor) -> None:
    model.eval()
    with torch.no_grad():
        full = model(x[:1])
        model.set_kv_cache(batch_size=1)
        model(x[:1, :4], input_pos=torch.arange(4))
        for i in range(4, x.shape[1]):
            step = model(x[:1, i : i + 1], input_pos=torch.tensor([i]))
            torch.testing.assert_close(step[0, -1], full[0, i], atol=1e-4, rtol=1e-4)
        model.clear_kv_cache()


@pytest.mark.parametrize("make_config", [neox_config, llama_config], ids=["neox", "llama_gqa"])
def test_litgpt_width_shrinks_layers_config_and_kv_cache(make_config):
    torch.manual_seed(0)
    config = make_config()
    model = GPT(config)
    x = tokens()
    optimizer = adam_stepped(model, x)
    n_head, groups, per = config.n_head, config.n_query_groups, config.n_head // config.n_query_groups
    width = config.intermediate_size
    fc_name = "fc" if make_config is neox_config else "fc_1"
    fc = model.transformer.h[0].mlp.get_submodule(fc_name)
    moment_before = optimizer.state[fc.weight]["exp_avg"].clone()
    wte, head = model.transformer.wte.weight.shape, model.lm_head.weight.shape

    pruner = StructuredPruner(round_to=8)
    pruner.discover(model, x)
    event = pruner.prune_to(model, 0.3, [optimizer])

    assert len(pruner.mlp) == 2 and len(pruner.heads) == 2
    kept_width = kept_units(width, 0.3, 8)
    kept_groups = round(groups * 0.7)
    assert config.intermediate_size == kept_width < width
    assert config.n_query_groups == kept_groups and config.n_head == kept_groups * per < n_head
    for block in model.transformer.h:
        assert block.attn.qkv.out_features == (kept_groups * per + 2 * kept_groups) * config.head_size
        assert block.attn.proj.in_features == kept_groups * per * config.head_size
        assert block.mlp.proj.in_features == kept_width
    assert model.transformer.wte.weight.shape == wte and model.lm_head.weight.shape == head
    # Adam's first moment follows the kept rows
    fc = model.transformer.h[0].mlp.get_submodule(fc_name)
    removed = set(event.removed[",".join(pruner.mlp[0].outputs)])
    kept = torch.tensor([i for i in range(width) if i not in removed])
    torch.testing.assert_close(optimizer.state[fc.weight]["exp_avg"], moment_before[kept])
    assert any(p is fc.weight for g in optimizer.param_groups for p in g["params"])
    # training goes on, and the KV cache decodes as the full forward does
    optimizer.zero_grad()
    model(x).pow(2).mean().backward()
    optimizer.step()
    assert_kv_cache_decode_matches(model, x)
    counts = pruner.parameter_counts(model)
    assert counts["mlp"] < pruner.params_before["mlp"] and counts["heads"] < pruner.params_before["heads"]
    assert linear_flops_per_token(model) < pruner.flops_before


def test_pruned_units_are_the_least_important():
    torch.manual_seed(0)
    model = GPT(neox_config(n_layer=1))
    mlp = model.transformer.h[0].mlp
    with torch.no_grad():
        mlp.fc.weight[:64] *= 0.01
        mlp.proj.weight[:, :64] *= 0.01
    pruner = StructuredPruner(round_to=8)
    pruner.discover(model, tokens())
    event = pruner.prune_to(model, 0.25)
    removed = event.removed["transformer.h.0.mlp.fc"]
    assert len(removed) == 32 and all(i < 64 for i in removed)


def test_taylor_importance_uses_accumulated_gradients():
    torch.manual_seed(0)
    model = GPT(neox_config(n_layer=1))
    pruner = StructuredPruner(importance="taylor", round_to=8)
    x = tokens()
    pruner.discover(model, x)
    model(x).pow(2).mean().backward()
    mlp = model.transformer.h[0].mlp
    with torch.no_grad():
        for param in (mlp.fc.weight, mlp.fc.bias, mlp.proj.weight):
            param.grad.zero_()
        mlp.fc.weight.grad[32:64] = 1.0
    pruner.taylor.accumulate(pruner.prunable_parameters(model))
    assert pruner.taylor.steps == 1
    event = pruner.prune_to(model, 0.75)
    # only units 32..63 have a nonzero score, and 32 of 128 units are kept
    assert event.removed["transformer.h.0.mlp.fc"] == list(range(32)) + list(range(64, 128))
    assert pruner.taylor.steps == 0


class EncoderNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 32)
        layer = nn.TransformerEncoderLayer(32, 2, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, VOCAB)

    def forward(self, x):
        return self.head(self.encoder(self.emb(x)))


def test_transformer_encoder_mlp_units_and_sgd_momentum():
    torch.manual_seed(0)
    model = EncoderNet()
    x = tokens()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(x).pow(2).mean().backward()
    optimizer.step()
    linear2 = model.encoder.layers[0].linear2
    momentum = optimizer.state[linear2.weight]["momentum_buffer"].clone()
    pruner = StructuredPruner(round_to=8)
    pruner.discover(model, x)
    assert {g.outputs for g in pruner.mlp} == {("encoder.layers.0.linear1",), ("encoder.layers.1.linear1",)}
    event = pruner.prune_to(model, 0.5, [optimizer])
    removed = set(event.removed["encoder.layers.0.linear1"])
    kept = torch.tensor([i for i in range(64) if i not in removed])
    linear2 = model.encoder.layers[0].linear2
    assert linear2.in_features == 32 and model.encoder.layers[0].linear1.out_features == 32
    torch.testing.assert_close(optimizer.state[linear2.weight]["momentum_buffer"], momentum[:, kept])
    assert model(x).shape == (2, 12, VOCAB)


def test_lightning_demo_transformer_mlp_units():
    torch.manual_seed(0)
    model = DemoTransformer(vocab_size=VOCAB, ninp=32, nhead=2, nhid=64, nlayers=1, dropout=0.0)
    x = tokens()
    pruner = StructuredPruner(round_to=8, forward_fn=lambda m, batch: m(batch, batch))
    pruner.discover(model, x)
    assert len(pruner.mlp) == 2  # the encoder layer's and the decoder layer's
    pruner.prune_to(model, 0.5)
    assert model.transformer.encoder.layers[0].linear1.out_features == 32
    assert model(x, x).shape[-1] == VOCAB


def test_depth_removes_the_block_that_changes_least():
    torch.manual_seed(0)
    config = neox_config(n_layer=4)
    model = GPT(config)
    with torch.no_grad():
        for layer in (model.transformer.h[2].attn.proj, model.transformer.h[2].mlp.proj):
            layer.weight.zero_()
            layer.bias.zero_()
    x = tokens()
    optimizer = adam_stepped(model, x)
    block3 = model.transformer.h[3]
    pruner = StructuredPruner(mode="depth")
    pruner.discover(model, x)
    event = pruner.prune_to(model, 0.3, [optimizer], held_out=[x])
    assert event.removed == {"transformer.h": [2]}
    fresh = GPT(neox_config(n_layer=4))
    assert reshape_to_state_dict(fresh, model.state_dict()) == ["transformer.h"]
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(x), model(x))
    assert len(model.transformer.h) == 3 and config.n_layer == 3 and model.transformer.h[2] is block3
    params = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert params == {id(p) for p in model.parameters()} and len(optimizer.state) == len(params)
    assert_kv_cache_decode_matches(model, x)


def test_fresh_model_takes_a_pruned_checkpoints_shapes():
    torch.manual_seed(0)
    model = GPT(llama_config())
    x = tokens()
    pruner = StructuredPruner()
    pruner.discover(model, x)
    pruner.prune_to(model, 0.4)
    fresh = GPT(llama_config())
    changed = reshape_to_state_dict(fresh, model.state_dict())
    assert "transformer.h.0.attn.qkv" in changed
    fresh.load_state_dict(model.state_dict())
    assert fresh.config.n_query_groups == model.config.n_query_groups
    torch.testing.assert_close(fresh(x), model(x))
    # and back: the pruned model takes the shapes of a file written before pruning
    unpruned = GPT(llama_config())
    reshape_to_state_dict(model, unpruned.state_dict())
    model.load_state_dict(unpruned.state_dict())
    assert model.config.n_query_groups == 4 and model.config.intermediate_size == 96
    torch.testing.assert_close(model(x), unpruned(x))


def test_kept_units_rounding():
    assert kept_units(2048, 0.3, 8) == 1432
    assert kept_units(100, 0.99, 8) == 8
    assert kept_units(8, 0.5, 8) == 8
    assert kept_units(64, 0.0, 8) == 64


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="mode"):
        StructuredPruner(mode="sideways")
    with pytest.raises(ValueError, match="importance"):
        StructuredPruner(importance="random")
    with pytest.raises(ValueError, match="round_to"):
        StructuredPruner(round_to=0)
    with pytest.raises(ValueError, match="nothing prunable"):
        StructuredPruner().discover(nn.Sequential(nn.Linear(4, 4)), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="depth"):
        StructuredPruner(mode="depth").discover(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4)), None)
    filtered = StructuredPruner(filter_fn=lambda module, name: "mlp" not in name)
    filtered.discover(copy.deepcopy(GPT(neox_config(n_layer=1))), tokens())
    assert filtered.mlp == [] and len(filtered.heads) == 1
    assert filtered.notes == [
        f"filter_fn selects {name}: embeddings and the output head are never pruned"
        for name in ("lm_head", "transformer.wte")
    ]


def test_a_layer_keeps_at_least_round_to_units_and_says_so():
    model = GPT(neox_config(n_layer=1))
    pruner = StructuredPruner(round_to=64)
    pruner.discover(model, tokens())
    pruner.prune_to(model, 0.9)
    assert model.config.intermediate_size == 64
    assert pruner.notes == ["transformer.h.0.mlp.fc: keeps at least round_to=64 of 128 units"]


def drive(windows: StepEnergyWindows, joules_at: dict[int, float], last_step: int) -> list[int]:
    """Mark at each step's end where the windows ask (the first event prunes at its step); returns the steps read."""
    read = []
    for step in range(1, last_step + 1):
        if step == windows.first_event_step:
            windows.first_event(step, joules_at[step])
        if step >= windows.next_step:
            read.append(step)
            windows.mark(step, joules_at[step])
    return read


def test_step_energy_windows_before_the_first_event_and_at_the_end():
    # 3 J per step up to the event at step 6, 1 J per step after it
    joules_at = {step: 3.0 * min(step, 6) + 1.0 * max(step - 6, 0) for step in range(0, 21)}
    windows = StepEnergyWindows(window_steps=4, first_event_step=6, last_event_step=9, total_steps=20)
    # readings only at the window edges and inside the last window: the other steps cost an int compare
    assert drive(windows, joules_at, 20) == [2, 16, 17, 18, 19, 20]
    assert windows.before == (2, 6.0, 6, 18.0)
    assert windows.j_per_step_before == 3.0 and windows.j_per_step_after == 1.0
    assert windows.after == (16, joules_at[16], 20, joules_at[20])


def test_step_energy_windows_edges():
    joules_at = {step: 2.0 * step for step in range(0, 11)}
    # an event at step 1 has no window before it (the first batch traces the model); the window after
    # starts at the last event when the fit is short
    windows = StepEnergyWindows(window_steps=5, first_event_step=1, last_event_step=8, total_steps=10)
    assert drive(windows, joules_at, 10) == [8, 9, 10]
    assert windows.j_per_step_before is None and windows.j_per_step_after == 2.0
    # a window before shorter than window_steps starts at step 1; a fit of unknown length has no window after
    windows = StepEnergyWindows(window_steps=5, first_event_step=3, last_event_step=3, total_steps=float("inf"))
    assert drive(windows, joules_at, 10) == [1]
    assert windows.before == (1, 2.0, 3, 6.0) and windows.j_per_step_after is None
    # a fit resumed after the first event has no window before it
    windows = StepEnergyWindows(window_steps=2, first_event_step=3, last_event_step=3, total_steps=10, start_step=5)
    assert windows.next_step == 8 and windows.j_per_step_before is None


def test_training_energy_leaves_out_validation_and_evaluation_and_adds_restored():
    energy = TrainingEnergy(restored_j=50.0)
    energy.start(energy_j=1000.0, evaluation_j=7.0)
    energy.validation_started(1100.0)
    energy.validation_ended(1130.0)
    energy.validation_ended(1200.0)  # an end without a start adds nothing
    # 300 J since the start, 30 J of validation, 12 J of evaluation blocks, 50 J before the checkpoint
    assert energy.energy_j(energy_j=1300.0, evaluation_j=19.0) == 50.0 + 300.0 - 30.0 - 12.0


class Reader:
    """A PowerSampler's readings, set by the test."""

    def __init__(self):
        self.now_j = 0.0
        self.evaluation_energy_j = 0.0

    def measured_now_j(self) -> float:
        return self.now_j

    def sources(self, all_processes: bool = False) -> str:
        return "simulated"


def test_pruning_energy_reads_at_the_window_steps_only_and_gives_both_eers():
    idle = PruningEnergy(window_steps=2)
    idle.start(None, [4, 6], total_steps=10, start_step=0)
    assert idle.next_step == float("inf") and idle.finish(1000, 500) == {}
    energy, reader = PruningEnergy(window_steps=2), Reader()
    reader.now_j = 100.0
    energy.start(reader, [4, 6], total_steps=10, start_step=0)
    read_at = []
    for step in range(1, 11):
        reader.now_j += 4.0 if step <= 4 else 2.0  # 4 J per step before the first event, 2 after
        if step == 5:
            energy.validation_started()
            reader.now_j += 30.0
            energy.validation_ended()
        if step == 4:
            energy.first_event(step)
        if step >= energy.next_step:
            read_at.append(step)
            energy.at_step(step)
    reader.evaluation_energy_j = 3.0
    reader.now_j += 3.0  # an evaluation block at the end of fit
    figures = energy.finish(params_before=1000, params_after=500)
    assert read_at == [2, 8, 9, 10]
    train_j = 4 * 4.0 + 6 * 2.0
    assert figures == {
        "train_energy_j": train_j,
        "train_energy_source": "simulated",
        "train_j_per_step_before": 4.0,
        "train_j_per_step_after": 2.0,
        "eer_j_per_initial_param": train_j / 1000,
        "eer_j_per_final_param": train_j / 500,
    }
    assert not energy.active and energy.finish(1000, 500) == {}
