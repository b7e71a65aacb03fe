"""EffectiveRankMonitor and ParameterSummary on a tiny two-tower model named like open_clip's CLIP."""

from __future__ import annotations

import csv
import errno
import json
import re
import threading
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from rich.console import Console
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kr_vlm import rank_report
from kr_vlm.adapters import AdapterConfig, adapted_layers, inject_adapters, kradapter_shapes
from kr_vlm.adapters.inject import count_parameters
from kr_vlm.adapters.labels import layer_labels
from kr_vlm.callbacks import rank_evaluation, rank_history, rank_monitor
from kr_vlm.callbacks.parameter_summary import (
    ParameterSummary,
    count_parameters_by_group,
    parameter_summary,
    parameter_table,
)
from kr_vlm.callbacks.rank_monitor import EffectiveRankMonitor, update_spectra
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
    trainer_args.setdefault("enable_checkpointing", False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=logger,
        callbacks=callbacks,
        default_root_dir=tmp_path,
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


def test_update_spectra_equal_the_svd_of_every_delta_weight():
    module = TinyModule("kradapter")
    for _, layer in adapted_layers(module):
        nn.init.normal_(layer.kr_u)  # a non-zero update
    layers = list(adapted_layers(module))
    per_layer = {name: singular_values(layer.delta_weight().detach()) for name, layer in layers}
    spectra = update_spectra(layers)
    assert spectra.keys() == per_layer.keys()
    for name, sigma in per_layer.items():
        torch.testing.assert_close(spectra[name], sigma, rtol=1e-5, atol=1e-6)


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
    spectra = {threads: update_spectra(layers, cpu_threads=threads) for threads in (1, None)}
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


# ------------------------------------------------------------------------ background thread, non-finite updates
class CallAt(pl.Callback):
    """Calls ``action(module, step)`` at the end of every training batch (after the callbacks before it)."""

    def __init__(self, action) -> None:
        self.action = action

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.action(pl_module, trainer.global_step)


def strictly_parsed(path) -> dict:
    """The JSON file parsed with NaN / Infinity literals refused, as strict parsers do."""

    def refuse(literal):
        raise ValueError(f"non-standard JSON literal {literal}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_monitor_skips_non_finite_updates_with_one_warning(tmp_path):
    module = TinyModule("kradapter")
    layers = dict(adapted_layers(module))
    names = list(layers)
    with torch.no_grad():
        for layer in layers.values():
            nn.init.normal_(layer.kr_u)
        layers[names[1]].kr_u[0, 0] = float("nan")
        layers[names[4]].kr_v[2, 1] = float("inf")
    monitor = EffectiveRankMonitor(output_dir=tmp_path)
    with pytest.warns(
        UserWarning, match=rf"{re.escape(names[1])} \(and 1 more layers\).*at step 5"
    ) as caught:
        record = monitor.evaluate(module, 5)
        monitor.evaluate(module, 6)  # skipped again, silently
    assert sum("not finite" in str(warning.message) for warning in caught) == 1
    assert record["non_finite"] == [names[1], names[4]]
    assert record["layers"][names[1]] == dict.fromkeys(("effective_rank", "stable_rank", "frobenius_norm"))
    assert names[1] not in monitor.final_spectra and names[0] in monitor.final_spectra

    monitor.write_history()
    monitor.write_report()
    history = strictly_parsed(tmp_path / "rank_history.json")
    assert history["layers"][names[1]]["effective_rank"] == [None, None]
    assert history["layers"][names[1]]["non_finite_steps"] == [5, 6]
    assert history["layers"][names[0]]["non_finite_steps"] == []
    finite = [history["layers"][name]["effective_rank"][-1] for name in names if name not in names[1:5:3]]
    assert history["groups"]["all"]["effective_rank"][-1] == pytest.approx(sum(finite) / len(finite))
    assert (tmp_path / "rank_report.html").exists()


def test_a_fit_with_non_finite_updates_logs_the_finite_ones(tmp_path):
    """The monitor snapshots a NaN update (put in just before it, taken out just after): no crash, no NaN logged."""
    saved = {}

    def poison(module, step):
        if step == 2:
            layer = next(layer for _, layer in adapted_layers(module))
            saved["value"] = layer.kr_v[0, 0].item()
            with torch.no_grad():
                layer.kr_v[0, 0] = float("nan")

    def restore(module, step):
        if step == 2:
            with torch.no_grad():
                next(layer for _, layer in adapted_layers(module)).kr_v[0, 0] = saved["value"]

    logger = CSVLogger(tmp_path, name="csv")
    monitor = EffectiveRankMonitor(every_n_steps=2)
    with pytest.warns(UserWarning, match="not finite .* at step 2"):
        fit(
            TinyModule("kradapter"),
            tmp_path,
            [CallAt(poison), monitor, CallAt(restore)],
            logger=logger,
            max_steps=4,
        )
    run_dir = tmp_path / "csv" / "version_0"
    history = strictly_parsed(run_dir / "rank_history.json")
    first = next(iter(history["layers"]))
    assert history["steps"] == [0, 2, 4] and history["layers"][first]["non_finite_steps"] == [2]
    rows = [row for row in read_csv_metrics(run_dir / "metrics.csv") if row.get("effective_rank/all")]
    assert [int(row["step"]) for row in rows] == [0, 2, 4]
    assert rows[1][f"effective_rank_per_layer/{first}"] == ""  # not logged at step 2, and no NaN
    assert all(value.lower() not in ("nan", "inf") for row in rows for value in row.values())


def test_background_evaluation_measures_the_snapshot_while_training_goes_on(tmp_path, monkeypatch):
    """The background thread is held back until step 5: the record of step 3 must still be step 3's factors."""
    gate = threading.Event()
    monkeypatch.setattr(rank_evaluation, "_lower_this_threads_priority", lambda: gate.wait(60))
    monitor = EffectiveRankMonitor(every_n_steps=3, on_train_start=False)
    seen = {}

    def probe(module, step):
        if step == 3:
            seen["factors"] = {
                name: layer.spectral_factors().snapshot() for name, layer in adapted_layers(module)
            }
        if step in (4, 5):
            seen[step] = [record["step"] for record in monitor.records]
        if step == 5:
            gate.set()

    logger = CSVLogger(tmp_path, name="csv")
    module = TinyModule("kradapter")
    fit(module, tmp_path, [monitor, CallAt(probe)], logger=logger, max_steps=6)
    assert seen[4] == seen[5] == []  # training went on while step 3 was pending
    assert [record["step"] for record in monitor.records] == [3, 6]
    for name, factors in seen["factors"].items():
        expected = rank_monitor.spectrum_metrics(factors.singular_values().float())
        assert monitor.records[0]["layers"][name] == pytest.approx(expected, rel=1e-6)
    rows = [
        row
        for row in read_csv_metrics(tmp_path / "csv" / "version_0" / "metrics.csv")
        if row.get("effective_rank/all")
    ]
    assert [int(row["step"]) for row in rows] == [3, 6]  # logged later, under the step they belong to


def test_background_and_training_thread_evaluations_agree(tmp_path):
    histories = []
    for background in (True, False):
        monitor = EffectiveRankMonitor(every_n_steps=2, background=background)
        fit(TinyModule("kradapter"), tmp_path / str(background), [monitor], max_steps=5)
        histories.append(strictly_parsed(tmp_path / str(background) / "rank_history.json"))
    assert histories[0]["steps"] == histories[1]["steps"] == [0, 2, 4, 5]
    assert histories[0]["layers"] == histories[1]["layers"]
    assert histories[0]["final_spectra"] == histories[1]["final_spectra"]


def test_checkpoints_taken_while_an_evaluation_runs_lose_no_step(tmp_path, monkeypatch):
    """Step 2's evaluation is still running at the step-2 and step-3 checkpoints (the thread is held back)."""
    gate = threading.Event()
    monkeypatch.setattr(rank_evaluation, "_lower_this_threads_priority", lambda: gate.wait(60))
    checkpoints = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1, filename="{step}"
    )
    monitor = EffectiveRankMonitor(every_n_steps=2, on_train_start=False)
    release = CallAt(lambda module, step: step == 4 and gate.set())
    fit(
        TinyModule("kradapter"),
        tmp_path,
        [monitor, release, checkpoints],
        max_steps=4,
        enable_checkpointing=True,
    )

    def monitor_state(step):
        checkpoint = torch.load(tmp_path / "ckpt" / f"step={step}.ckpt", weights_only=False)
        return next(state for key, state in checkpoint["callbacks"].items() if "EffectiveRankMonitor" in key)

    # At step 2 the evaluation of that very step runs: a resumed run evaluates it again. At step 3 it is
    # finished into the checkpoint.
    assert monitor_state(2) == {"unfinished_step": 2, "records": []}
    assert [record["step"] for record in monitor_state(3)["records"]] == [2]
    for step in (2, 3):
        resumed = EffectiveRankMonitor(every_n_steps=2, on_train_start=False)
        trainer = pl.Trainer(
            accelerator="cpu",
            max_steps=4,
            logger=False,
            callbacks=[resumed],
            default_root_dir=tmp_path / f"resumed{step}",
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=False,
        )
        trainer.fit(TinyModule("kradapter"), ckpt_path=tmp_path / "ckpt" / f"step={step}.ckpt")
        assert [record["step"] for record in resumed.records] == [2, 4]


def test_thread_counts_set_in_a_background_thread_stay_in_that_thread():
    before = torch.get_num_threads()
    inside, release = threading.Event(), threading.Event()
    counts = {}

    def work():
        with rank_evaluation._intra_op_threads(before + 1):
            counts["worker"] = torch.get_num_threads()
            inside.set()
            release.wait(30)

    thread = threading.Thread(target=work)
    thread.start()
    inside.wait(30)
    counts["main"] = torch.get_num_threads()
    release.set()
    thread.join()
    assert counts == {"worker": before + 1, "main": before}


# ------------------------------------------------------------------------------- watching a run as it trains
def test_the_report_is_rewritten_while_the_run_trains_and_says_when_it_finished(tmp_path, monkeypatch):
    """With the defaults (background decompositions, live report), the page exists after the first
    evaluations and before the end, says the step and that training goes on; at the end it says finished.
    The live pages are rendered in the monitor's background thread, the final one at train end."""
    seen = {}
    renders = []
    write_report = rank_history.ReportFiles.write_report

    def recorded(files, history, spectra, finished):
        renders.append((finished, threading.current_thread().name))
        return write_report(files, history, spectra, finished)

    monkeypatch.setattr(rank_history.ReportFiles, "write_report", recorded)

    def look(module, step):
        if step != 7:
            return
        report = tmp_path / "rank_report.html"
        deadline = time.monotonic() + 120  # the background thread renders it; training waits here
        while time.monotonic() < deadline and "still running" not in seen.get("page", ""):
            seen["page"] = report.read_text(encoding="utf-8") if report.exists() else ""
            time.sleep(0.05)
        seen["history"] = json.loads((tmp_path / "rank_history.json").read_text())

    monitor = EffectiveRankMonitor(every_n_steps=2)
    fit(TinyModule("kradapter"), tmp_path, [monitor, CallAt(look)], max_steps=8)
    shown = re.search(r"this page shows step (\d+)", seen["page"])
    assert shown and int(shown.group(1)) in (0, 2, 4, 6)
    assert "Training is still running" in seen["page"] and seen["page"].count("data:image/png;base64,") == 3
    assert 0 < len(seen["history"]["steps"]) < 5 and seen["history"]["final_step"] < 8
    final = (tmp_path / "rank_report.html").read_text(encoding="utf-8")
    assert "Training finished at step 8." in final and "still running" not in final
    assert not list(tmp_path.glob(".*.tmp"))  # every file replaced atomically, no temporary left
    training_thread = threading.current_thread().name
    assert renders[-1] == (True, training_thread)
    assert renders[:-1] and all(
        not finished and thread.startswith("kr_vlm-rank-monitor") for finished, thread in renders[:-1]
    )


def test_the_live_report_can_be_turned_off(tmp_path):
    pages = []
    monitor = EffectiveRankMonitor(every_n_steps=2, live_report=False)
    fit(
        TinyModule("kradapter"),
        tmp_path,
        [monitor, CallAt(lambda module, step: pages.append((tmp_path / "rank_report.html").exists()))],
        max_steps=4,
    )
    assert not any(pages) and (tmp_path / "rank_report.html").exists()


def test_tensorboard_gets_a_layout_of_the_rank_charts_by_tower_and_layer_type(monitored_run):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.custom_scalar import layout_pb2

    (event_file,) = Path(monitored_run[4]).glob("events.out.tfevents.*")
    layouts = [
        layout_pb2.Layout.FromString(value.tensor.string_val[0])
        for event in EventFileLoader(str(event_file)).Load()
        for value in event.summary.value
        if value.metadata.plugin_data.plugin_name == "custom_scalars"
    ]
    assert len(layouts) == 1
    categories = {category.title: category.chart for category in layouts[0].category}
    groups = [f"{tower}/{kind}" for tower in ("vision", "text") for kind in ("q", "k", "v", "o", "fc1", "fc2")]
    assert list(categories) == [f"rank {group}" for group in [*groups, "all"]]
    charts = {chart.title: list(chart.multiline.tag) for chart in categories["rank text/fc1"]}
    per_layer = charts.pop("effective rank of each layer")  # the monitor's default: log_per_layer=True
    assert charts == {
        "effective rank and rank cap": ["effective_rank/text/fc1", "rank_cap/text/fc1"],
        "stable rank": ["stable_rank/text/fc1"],
        "‖ΔW‖_F / ‖W0‖_F": ["relative_update/text/fc1"],
    }
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logged = set(EventAccumulator(monitored_run[4]).Reload().Tags()["scalars"])
    fc1_layers = {tag for tag in logged if re.fullmatch(r"effective_rank_per_layer/model\.transformer\..*c_fc", tag)}
    assert {tag for tag in logged if any(re.fullmatch(regex, tag) for regex in per_layer)} == fc1_layers
    assert len(fc1_layers) == BLOCKS
    # Every tag (a regular expression) of the layout is one the monitor logs.
    regexes = {tag for chart in categories.values() for entry in chart for tag in entry.multiline.tag}
    assert all(any(re.fullmatch(regex, tag) for tag in logged) for regex in regexes)
    method, _, _, history, _ = monitored_run
    cap = [event.value for event in EventAccumulator(monitored_run[4]).Reload().Scalars("rank_cap/text/q")]
    assert cap == [2 if method == "lora" else TEXT_WIDTH] * len(history["steps"])


@pytest.mark.parametrize("failure", ["not a folder", "full disk"])
def test_a_report_that_cannot_be_written_is_one_warning_per_file_and_the_run_completes(
    tmp_path, monkeypatch, failure
):
    if failure == "not a folder":
        (tmp_path / "a_file").write_text("")
        output_dir = tmp_path / "a_file" / "run"  # mkdir fails: Not a directory (root ignores read-only modes)
    else:
        output_dir = tmp_path / "run"

        def full_disk(path, _):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

        monkeypatch.setattr(rank_history, "write_text_atomic", full_disk)
        monkeypatch.setattr(rank_history, "write_bytes_atomic", full_disk)
        monkeypatch.setattr(rank_report, "write_text_atomic", full_disk)
    monitor = EffectiveRankMonitor(every_n_steps=2, output_dir=output_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit(TinyModule("kradapter"), tmp_path, [monitor], max_steps=5)
    assert trainer.global_step == 5 and [record["step"] for record in monitor.records] == [0, 2, 4, 5]
    messages = [str(warning.message) for warning in caught if "could not write" in str(warning.message)]
    written = sorted(message.split(" could not write ")[1].split(":")[0] for message in messages)
    names = ("rank_history.json", "rank_history.png", "rank_report.html", "rank_spectra.png")
    assert written == sorted(str(output_dir / name) for name in names)  # one warning a file


def test_a_run_that_fails_leaves_a_report_that_says_it_stopped(tmp_path):
    report = tmp_path / "rank_report.html"

    def fail(module, step):
        if step == 5:
            deadline = time.monotonic() + 120  # a live page is rendered (training waits here), then it fails
            while time.monotonic() < deadline and not report.exists():
                time.sleep(0.05)
            raise RuntimeError("a bug at step 5")

    with pytest.raises(RuntimeError, match="a bug at step 5"):
        fit(TinyModule("kradapter"), tmp_path, [EffectiveRankMonitor(every_n_steps=2), CallAt(fail)], max_steps=8)
    page = report.read_text(encoding="utf-8")
    assert "Training stopped at step 5 before it finished" in page and "still running" not in page
    assert page.count("data:image/png;base64,") == 3
