"""The Python API from the seed: Trainer(...).fit(), load_run, weights, plug-ins by registry and import path."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from stride import Trainer, register_model
from stride.datasets import DataSplits
from stride.errors import ConfigError, RunError
from stride.registry import register_dataset


def test_fit_then_load_run_restores_config_and_weights(tmp_path):
    trainer = Trainer(work_dir=tmp_path, model_kwargs={"model_name": "MLP", "hidden": [64]},
                      training_kwargs={"epochs": 3}, device="cpu")
    results = trainer.fit()
    assert (tmp_path / "0" / "config.json").is_file()
    loaded = Trainer(work_dir=tmp_path).load_run("0")
    assert loaded.config["model_kwargs"] == {"model_name": "MLP", "hidden": [64]}
    assert loaded.evaluate("test")["test_accuracy"] == pytest.approx(results["test_accuracy"])
    best = torch.load(tmp_path / "0" / "weights" / "best.pt", weights_only=True)["model"]
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, best[name])


def test_best_weights_are_those_of_the_best_epoch_though_checkpoints_keep_their_own_cadence(tmp_path):
    """With short epochs a run checkpoints at its end, not after every epoch; best.pt still holds the best epoch's
    weights, kept in memory until then (here the best epoch is not the last: lr so high that training degrades)."""
    trainer = Trainer(work_dir=tmp_path, model_kwargs={"model_name": "MLP", "hidden": [32]}, device="cpu",
                      training_kwargs={"epochs": 6, "lr": 0.3, "scheduler": "constant"})
    results = trainer.fit()
    run = tmp_path / "0"
    assert [p.name for p in (run / "checkpoints").glob("step_*.pt")] == [f"step_{results['steps']:09d}.pt"]
    best = torch.load(run / "weights" / "best.pt", weights_only=True)
    assert best["best"] == results["best"]
    val = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == "val"]
    assert best["best"]["value"] == max(r["val_accuracy"] for r in val)
    assert best["best"]["epoch"] < 5, "pick settings whose best epoch is not the last one"
    reloaded = Trainer(work_dir=tmp_path).load_run("0")
    assert reloaded.evaluate("val")["val_accuracy"] == pytest.approx(best["best"]["value"])


def test_load_run_of_missing_run_is_a_clear_error(tmp_path):
    with pytest.raises(RunError, match="run '7' does not exist"):
        Trainer(work_dir=tmp_path).load_run("7")
    with pytest.raises(ConfigError, match="not allowed"):
        Trainer(work_dir=tmp_path).load_run("..")


def test_registered_dataset_and_model_plug_in_without_editing_stride(tmp_path):
    @register_dataset("tiny_blobs")
    def tiny_blobs(n: int = 300) -> DataSplits:
        g = torch.Generator().manual_seed(0)
        y = torch.randint(0, 2, (n,), generator=g)
        x = torch.randn(n, 2, generator=g) + 3 * y[:, None].float()
        data = torch.utils.data.TensorDataset(x, y)
        return DataSplits(*torch.utils.data.random_split(data, [200, 50, 50], generator=g),
                          input_shape=(2,), num_outputs=2)

    @register_model("TinyLinear")
    class TinyLinear(torch.nn.Module):
        def __init__(self, input_shape, num_outputs, scale: float = 1.0):
            super().__init__()
            self.lin = torch.nn.Linear(input_shape[0], num_outputs)

        def forward(self, x):
            return self.lin(x)

    trainer = Trainer(work_dir=tmp_path, dataset_kwargs={"dataset_name": "tiny_blobs", "n": 300},
                      model_kwargs={"model_name": "TinyLinear", "scale": 2.0},
                      training_kwargs={"epochs": 30, "lr": 0.1})
    assert trainer.fit()["test_accuracy"] > 0.9
    with pytest.raises(ConfigError, match="unknown config key 'model_kwargs.scal' for model 'TinyLinear'"):
        Trainer(work_dir=tmp_path, dataset_kwargs={"dataset_name": "tiny_blobs"},
                model_kwargs={"model_name": "TinyLinear", "scal": 2.0})


def test_model_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(
        "import torch\nclass Wide(torch.nn.Module):\n"
        "    def __init__(self, input_shape, num_outputs, width=32):\n"
        "        super().__init__(); self.net = torch.nn.Sequential(torch.nn.Flatten(), "
        "torch.nn.Linear(64, width), torch.nn.ReLU(), torch.nn.Linear(width, num_outputs))\n"
        "    def forward(self, x): return self.net(x)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    trainer = Trainer(work_dir=tmp_path / "exp", model_kwargs={"model_name": "my_models:Wide", "width": 48},
                      training_kwargs={"epochs": 2})
    assert trainer.model.net[1].out_features == 48
    assert trainer.fit()["test_accuracy"] > 0.5
    with pytest.raises(ConfigError, match="has no attribute 'Narrow'"):
        Trainer(work_dir=tmp_path, model_kwargs={"model_name": "my_models:Narrow"})
    sys.modules.pop("my_models", None)


def test_regression_dataset_and_resnet_build_and_train(tmp_path):
    reg = Trainer(work_dir=tmp_path, dataset_kwargs={"dataset_name": "synthetic_regression", "num_samples": 1024},
                  model_kwargs={"model_name": "MLP"}, training_kwargs={"epochs": 8})
    results = reg.fit()
    assert "test_accuracy" not in results
    assert results["test_loss"] < 0.5 * reg.evaluate("test")["test_loss"] + 1.0  # finite and trained
    first = [l for l in (tmp_path / "0" / "metrics.jsonl").read_text().splitlines() if '"val"' in l][0]
    assert results["val_loss"] < __import__("json").loads(first)["val_loss"]
    resnet = Trainer(work_dir=tmp_path, model_kwargs={"model_name": "ResNet"}, training_kwargs={"epochs": 2})
    assert resnet.fit()["test_accuracy"] > 0.5
