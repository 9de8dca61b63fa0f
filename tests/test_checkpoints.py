"""last.ckpt follows the latest epoch while best-*.ckpt keeps the best one."""

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks.checkpoints import BestAndLatestCheckpoint


class _Worsening(LightningModule):
    """Logs a validation score that only gets worse, so epoch 0 stays the best."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(2, 1)

    def training_step(self, batch, _):
        return self.net(batch[0]).pow(2).mean()

    def validation_step(self, batch, _):
        self.log("val/score", 1.0 / (1 + self.current_epoch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader():
    return DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=4)


def test_last_checkpoint_is_the_latest_epoch_and_best_the_best(tmp_path):
    callback = BestAndLatestCheckpoint(dirpath=tmp_path, filename="best-epoch{epoch:03d}", auto_insert_metric_name=False,
                                       monitor="val/score", mode="max", save_top_k=1, save_last=True)
    trainer = Trainer(max_epochs=4, callbacks=[callback], logger=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu")
    trainer.fit(_Worsening(), _loader(), _loader())
    last = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)
    best = torch.load(tmp_path / "best-epoch000.ckpt", map_location="cpu", weights_only=False)
    assert (last["epoch"], last["global_step"]) == (3, 8)  # plain ModelCheckpoint leaves it at epoch 0
    assert best["epoch"] == 0
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["best-epoch000.ckpt", "last.ckpt"]
    assert callback.best_model_path.endswith("best-epoch000.ckpt")
