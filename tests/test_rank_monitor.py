"""EffectiveRankMonitor and ParameterSummary on a tiny two-tower model named like open_clip's CLIP."""

from __future__ import annotations

import csv
import json
import re

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from rich.console import Console
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kr_vlm.adapters import AdapterConfig, adapted_layers, inject_adapters, kradapter_shapes
from kr_vlm.adapters.inject import count_parameters
from kr_vlm.adapters.labels import layer_labels
from kr_vlm.callbacks.parameter_summary import (
    ParameterSummary,
    count_parameters_by_group,
    parameter_summary,
    parameter_table,
)
from kr_vlm.callbacks.rank_monitor import EffectiveRankMonitor, delta_weight_spectra
from kr_vlm.models.targets import clip_targets
from kr_vlm.rank_report import layer_history_figure, layers_by_group, spectra_figure
from kr_vlm.spectral import effective_rank, singular_values, stable_rank

VISION_WIDTH, TEXT_WIDTH, BLOCKS, CLASSES = 12, 8, 2, 3
TARGETS = ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "mlp.c_fc", "mlp.c_proj"]


class TinyAttention(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(width, width), nn.Linear(width, width)
        self.v_proj, self.out_proj = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(torch.sigmoid(self.q_proj(x) * self.k_proj(x)) * self.v_proj(x))


class TinyMlp(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.c_fc, self.c_proj = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class TinyBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.attn, self.mlp = TinyAttention(width), TinyMlp(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.mlp(x)


class TinyTransformer(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(TinyBlock(width) for _ in range(BLOCKS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class TinyVisual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.transformer = TinyTransformer(VISION_WIDTH)


class TinyTwoTower(nn.Module):
    """Module names as in a converted open_clip CLIP: ``visual.transformer.resblocks.0.attn.q_proj``, ..."""

    def __init__(self) -> None:
        super().__init__()
        self.visual = TinyVisual()
        self.transformer = TinyTransformer(TEXT_WIDTH)
        self.head = nn.Linear(VISION_WIDTH + TEXT_WIDTH, CLASSES)

    def forward(self, image_x: torch.Tensor, text_x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.visual.transformer(image_x), self.transformer(text_x)], dim=-1))


class TinyModule(pl.LightningModule):
    def __init__(self, method: str | None = "kradapter", **options) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = TinyTwoTower()
        if method is not None:
            # CLIP's target selection: every layer of TARGETS in both towers, labelled with tower and layer type.
            inject_adapters(self.model, AdapterConfig(method, clip_targets(self.model), **options))

    def training_step(self, batch, batch_idx):
        image_x, text_x, labels = batch
        return F.cross_entropy(self.model(image_x, text_x), labels)

    def test_step(self, batch, batch_idx):
        self.model(batch[0], batch[1])

    def configure_optimizers(self):
        trainable = [p for p in self.parameters() if p.requires_grad] or [nn.Parameter(torch.zeros(1))]
        return torch.optim.AdamW(trainable, lr=1e-2)

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(0)
        data = TensorDataset(
            torch.randn(16, VISION_WIDTH, generator=generator),
            torch.randn(16, TEXT_WIDTH, generator=generator),
            torch.randint(CLASSES, (16,), generator=generator),
        )
        return DataLoader(data, batch_size=4)


def fit(
    module: pl.LightningModule, tmp_path, callbacks, logger=False, max_steps=7, **trainer_args
) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=logger,
        callbacks=callbacks,
        default_root_dir=tmp_path,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        **trainer_args,
    )
    trainer.fit(module)
    return trainer


def read_csv_metrics(path) -> list[dict[str, str]]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def expected_group(name: str) -> str:
    tower = "vision" if ".visual." in f".{name}" else "text"
    layer_type = {
        "q_proj": "q",
        "k_proj": "k",
        "v_proj": "v",
        "out_proj": "o",
        "c_fc": "fc1",
        "c_proj": "fc2",
    }
    return f"{tower}/{layer_type[name.rsplit('.', 1)[-1]]}"


def test_layers_are_labelled_by_the_target_selection():
    labels = layer_labels(TinyModule("kradapter"))
    assert len(labels) == 2 * BLOCKS * len(TARGETS)
    assert labels["model.visual.transformer.resblocks.1.attn.q_proj"] == {
        "tower": "vision",
        "layer": "q",
        "block": 1,
    }
    assert labels["model.transformer.resblocks.0.mlp.c_proj"] == {"tower": "text", "layer": "fc2", "block": 0}


def test_groups_come_in_model_order(tmp_path):
    # Towers of one width: the decompositions stack the text tower's q/k/v/o with the vision tower's.
    model = TinyTwoTower()
    model.visual.transformer = TinyTransformer(TEXT_WIDTH)
    inject_adapters(model, AdapterConfig("kradapter", clip_targets(model)))
    monitor = EffectiveRankMonitor(output_dir=tmp_path)
    record = monitor.evaluate(model, 0)
    layer_types = ["q", "k", "v", "o", "fc1", "fc2"]
    expected = [f"{tower}/{layer}" for tower in ("vision", "text") for layer in layer_types]
    assert list(monitor.group_metrics(record)) == [*expected, "all"]
    assert list(monitor.spectra_by_group()) == expected


def test_batched_spectra_equal_per_layer_spectra():
    module = TinyModule("kradapter")
    for _, layer in adapted_layers(module):
        nn.init.normal_(layer.kr_u)  # a non-zero update
    layers = list(adapted_layers(module))
    per_layer = {name: singular_values(layer.delta_weight().detach()) for name, layer in layers}
    for max_stack_elements in (2**27, 200, 1):  # all in one stack per shape, a few per call, one per call
        batched = delta_weight_spectra(layers, max_stack_elements=max_stack_elements)
        assert batched.keys() == per_layer.keys()
        for name, sigma in per_layer.items():
            torch.testing.assert_close(batched[name], sigma, rtol=1e-5, atol=1e-6)


def test_monitor_evaluates_outside_lightning(tmp_path):
    module = TinyModule("kradapter")
    monitor = EffectiveRankMonitor(output_dir=tmp_path / "ranks")
    for step in (0, 10):
        for _, layer in adapted_layers(module):
            nn.init.normal_(layer.kr_u)
        record = monitor.evaluate(module, step)
        assert record["step"] == step and len(record["layers"]) == 2 * BLOCKS * len(TARGETS)
    monitor.write_history()
    monitor.write_report()
    assert json.loads((tmp_path / "ranks" / "rank_history.json").read_text())["steps"] == [0, 10]
    assert (tmp_path / "ranks" / "rank_report.html").exists()


@pytest.fixture(
    scope="module", params=[("kradapter", {}), ("lora", {"r": 2, "lora_alpha": 2})], ids=["kradapter", "lora"]
)
def monitored_run(request, tmp_path_factory):
    """One 7-step fit with the monitor every 3 steps, logging to CSV (first logger) and TensorBoard."""
    method, options = request.param
    tmp_path = tmp_path_factory.mktemp(method)
    module = TinyModule(method, **options)
    loggers = [
        CSVLogger(tmp_path, name="csv"),
        TensorBoardLogger(tmp_path, name="tb", default_hp_metric=False),
    ]
    fit(module, tmp_path, [EffectiveRankMonitor(every_n_steps=3)], logger=loggers, max_steps=7)
    run_dir = tmp_path / "csv" / "version_0"  # trainer.log_dir: the first logger's folder
    history = json.loads((run_dir / "rank_history.json").read_text())
    return method, module, run_dir, history, loggers[1].log_dir


def test_monitor_evaluates_at_start_every_n_steps_and_end(monitored_run):
    _, _, run_dir, history, _ = monitored_run
    assert history["steps"] == [0, 3, 6, 7]
    rows = [row for row in read_csv_metrics(run_dir / "metrics.csv") if row.get("effective_rank/all")]
    assert [int(row["step"]) for row in rows] == [0, 3, 6, 7]


def test_monitor_values_match_the_spectral_functions(monitored_run):
    method, module, run_dir, history, _ = monitored_run
    last_row = [row for row in read_csv_metrics(run_dir / "metrics.csv") if row.get("effective_rank/all")][-1]
    layers = dict(adapted_layers(module))
    assert set(history["layers"]) == set(layers) and len(layers) == 2 * BLOCKS * len(TARGETS)
    for name, layer in layers.items():
        info = history["layers"][name]
        assert info["shape"] == [layer.out_features, layer.in_features]
        delta = layer.delta_weight().detach()
        final = {
            "effective_rank": effective_rank(delta),
            "stable_rank": stable_rank(delta),
            "frobenius_norm": delta.norm(),
        }
        for metric, value in final.items():
            assert info[metric][-1] == pytest.approx(float(value), rel=1e-4), (name, metric)
        assert float(last_row[f"effective_rank_per_layer/{name}"]) == pytest.approx(
            info["effective_rank"][-1], rel=1e-5
        )
        assert len(history["final_spectra"][name]) == min(layer.out_features, layer.in_features)
        assert info["effective_rank"][0] == 0  # both methods' updates start at zero
        assert info["effective_rank"][-1] > 1
        if method == "lora":
            assert info["effective_rank"][-1] <= 2 + 1e-3
    assert history["parameters"]["methods"] == [method]
    assert history["parameters"]["trainable"] == count_parameters(module)[0]


def test_monitor_averages_per_tower_and_layer_type(monitored_run):
    _, module, run_dir, history, _ = monitored_run
    last_row = [row for row in read_csv_metrics(run_dir / "metrics.csv") if row.get("effective_rank/all")][-1]
    for name, info in history["layers"].items():
        assert info["group"] == expected_group(name)
    groups = {expected_group(name) for name in history["layers"]}
    assert len(groups) == 12 and set(history["groups"]) == groups | {"all"}
    for group in groups | {"all"}:
        members = [info for info in history["layers"].values() if group in ("all", info["group"])]
        for metric in ("effective_rank", "stable_rank", "frobenius_norm"):
            mean = sum(info[metric][-1] for info in members) / len(members)
            assert history["groups"][group][metric][-1] == pytest.approx(mean)
            assert float(last_row[f"{metric}/{group}"]) == pytest.approx(mean, rel=1e-5)


def test_monitor_writes_plots_and_a_self_contained_report(monitored_run):
    method, _, run_dir, _, _ = monitored_run
    for png in ("rank_spectra.png", "rank_history.png"):
        assert (run_dir / png).read_bytes().startswith(b"\x89PNG")
    report = (run_dir / "rank_report.html").read_text(encoding="utf-8")
    # Effective rank over steps (group means, and every layer by group), spectra.
    assert report.count("data:image/png;base64,") == 3
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//)""", report, flags=re.IGNORECASE)
    assert "<link" not in report and "<script" not in report
    assert f"<td>{method}</td>" in report and "effective rank" in report.lower()
    assert "<td>vision/fc1</td>" in report and "<td>text/o</td>" in report
    # Each group's true rank cap (LoRA's r, not min(d_out, d_in)) and the share of it that is used.
    cap = 2 if method == "lora" else TEXT_WIDTH
    assert f"<td>text/q</td><td>{BLOCKS}</td><td>{TEXT_WIDTH}×{TEXT_WIDTH}</td><td>{cap}</td>" in report
    assert (
        "<th>% of cap</th>" in report and "<th>‖ΔW‖<sub>F</sub> / ‖W<sub>0</sub>‖<sub>F</sub></th>" in report
    )
    assert "‖ΔW‖_F" not in report and "σ_i" not in report


def test_history_records_rank_caps_and_base_weight_norms(monitored_run):
    method, module, _, history, _ = monitored_run
    for name, layer in adapted_layers(module):
        info = history["layers"][name]
        assert info["rank_cap"] == (2 if method == "lora" else min(info["shape"]))
        base = layer.module.base_layer.weight if method == "lora" else layer.base_layer.weight
        assert info["base_norm"] == pytest.approx(float(base.norm()), rel=1e-6)


def test_plots_label_their_axes_in_mathtext_and_draw_every_layer(monitored_run):
    method, _, _, history, _ = monitored_run
    groups = layers_by_group(history["layers"])
    spectra = {group: [history["final_spectra"][name] for name in names] for group, names in groups.items()}
    assert spectra_figure(spectra, 7).axes[0].get_ylabel().startswith(r"$\sigma_i \,/\, \sigma_1$")
    panels = layer_history_figure(history).axes
    cap = 2 if method == "lora" else VISION_WIDTH
    assert [len(axes.lines) for axes in panels] == [BLOCKS + 1] * 12  # a line a layer, and the cap
    assert panels[0].get_title() == f"vision/q ({BLOCKS} layers, cap {cap})"


def test_monitor_logs_scalars_histograms_and_an_image_to_tensorboard(monitored_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(monitored_run[4]).Reload()
    tags = events.Tags()
    assert {"effective_rank/vision/q", "stable_rank/text/fc2", "frobenius_norm/all"} <= set(tags["scalars"])
    assert [event.step for event in events.Scalars("effective_rank/all")] == [0, 3, 6, 7]
    assert "singular_values/vision/fc1" in tags["histograms"]
    assert tags["images"] == ["rank_spectra"]


def test_monitor_evaluates_each_step_once_with_gradient_accumulation(tmp_path):
    monitor = EffectiveRankMonitor(every_n_steps=2, on_train_start=False)
    fit(TinyModule("kradapter"), tmp_path, [monitor], max_steps=4, accumulate_grad_batches=2)
    assert [record["step"] for record in monitor.records] == [2, 4]
    # Without a logger the files go to the trainer's default_root_dir.
    assert json.loads((tmp_path / "rank_history.json").read_text())["steps"] == [2, 4]
    assert (tmp_path / "rank_report.html").exists()


def test_monitor_history_survives_resuming_from_a_checkpoint(tmp_path):
    module = TinyModule("kradapter")
    trainer = fit(module, tmp_path, [EffectiveRankMonitor(every_n_steps=2)], max_steps=4)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    resumed = EffectiveRankMonitor(every_n_steps=2)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=6,
        logger=False,
        callbacks=[resumed],
        default_root_dir=tmp_path,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    trainer.fit(TinyModule("kradapter"), ckpt_path=tmp_path / "last.ckpt")
    assert [record["step"] for record in resumed.records] == [0, 2, 4, 6]
    assert json.loads((tmp_path / "rank_history.json").read_text())["steps"] == [0, 2, 4, 6]


def test_monitor_warns_once_when_the_model_has_no_adapters(tmp_path):
    with pytest.warns(UserWarning, match="no adapted layers") as caught:
        fit(TinyModule(method=None), tmp_path, [EffectiveRankMonitor(every_n_steps=1)], max_steps=3)
    assert sum("no adapted layers" in str(w.message) for w in caught) == 1
    assert not (tmp_path / "rank_history.json").exists()


@pytest.mark.parametrize("every_n_steps", [-1, 1.5, True, None])
def test_monitor_rejects_a_bad_interval(every_n_steps):
    with pytest.raises(ValueError, match="every_n_steps"):
        EffectiveRankMonitor(every_n_steps=every_n_steps)


@pytest.mark.parametrize("cpu_threads", [0, 1.0, False])
def test_monitor_rejects_a_bad_thread_count(cpu_threads):
    with pytest.raises(ValueError, match="cpu_threads"):
        EffectiveRankMonitor(cpu_threads=cpu_threads)


def test_cpu_decomposition_restores_the_thread_count():
    layers = list(adapted_layers(TinyModule("kradapter")))
    before = torch.get_num_threads()
    spectra = {threads: delta_weight_spectra(layers, cpu_threads=threads) for threads in (1, None)}
    assert torch.get_num_threads() == before
    for name, sigma in spectra[1].items():
        torch.testing.assert_close(sigma, spectra[None][name])


def test_parameter_counts_per_group_add_up():
    module = TinyModule("kradapter")
    counts = {count.group: count for count in count_parameters_by_group(module)}
    for width, tower in ((VISION_WIDTH, "vision"), (TEXT_WIDTH, "text")):
        k, _, r, r2 = kradapter_shapes(width, width)
        assert counts[f"{tower}/q"].trainable == BLOCKS * k * (r + r2)
        assert counts[f"{tower}/q"].total == BLOCKS * (k * (r + r2) + width * width + width)
        k, _, r, r2 = kradapter_shapes(2 * width, width)
        assert counts[f"{tower}/fc1"].trainable == BLOCKS * k * (r + r2)
    head = (VISION_WIDTH + TEXT_WIDTH) * CLASSES + CLASSES
    assert counts["other/other"].trainable == 0 and counts["other/other"].total == head
    trainable, total = count_parameters(module)
    assert sum(c.trainable for c in counts.values()) == trainable
    assert sum(c.total for c in counts.values()) == total
    summary = parameter_summary(module)
    assert (summary["trainable"], summary["total"]) == (trainable, total)
    assert summary["trainable_percent"] == pytest.approx(100 * trainable / total)

    console = Console(record=True, width=120)
    console.print(parameter_table(module))
    text = console.export_text()
    assert "Parameters (kradapter)" in text and f"{trainable:,}" in text and f"{total:,}" in text


def test_parameter_summary_callback_prints_once_and_logs_hyperparameters(tmp_path, capsys):
    logger = CSVLogger(tmp_path, name="csv")
    module = TinyModule("lora", r=2)
    trainer = fit(module, tmp_path, [ParameterSummary()], logger=logger, max_steps=1)
    # The counts did not change between fit and test: the table is not printed again.
    trainer.test(module, dataloaders=module.train_dataloader(), verbose=False)
    printed = capsys.readouterr().out
    assert printed.count("Parameters (lora)") == 1
    assert f"{count_parameters(module)[0]:,}" in printed
    hparams = (tmp_path / "csv" / "version_0" / "hparams.yaml").read_text()
    assert f"trainable: {count_parameters(module)[0]}" in hparams
