"""The variational autoencoder that screens orders, and its versioned artifact.

Trained on normal orders only. The decoder is Gaussian with a learned variance per feature,
so a feature that normal orders predict well (a customer's pace, a product's price) weighs
more than one they do not (the hour). An order's anomaly score is its negative ELBO: the
negative log-likelihood of the order under the decoded latent mean, plus the KL divergence
of its latent code from the prior, in standardised feature units. The threshold is the
score that the chosen share of held-out normal orders exceed (the target false-positive
rate).

An artifact is one directory, written whole or not at all:
    model.pt       the weights (state dict)
    model.json     schema, scaler, threshold, architecture, metrics, training data range
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from order_services.screening import features

ARTIFACT_VERSION = 2


def _torch():
    import torch

    # OMP_NUM_THREADS when set (the streaming job sets 1: Spark already runs a Python worker
    # per core), else up to 2 threads for a job that runs alone (training, batch scoring).
    threads = os.environ.get("OMP_NUM_THREADS", "")
    torch.set_num_threads(int(threads) if threads.isdigit() and int(threads) > 0
                          else max(1, min(2, os.cpu_count() or 1)))
    return torch


def _network(inputs: int, hidden: int, latent: int):
    torch = _torch()
    nn = torch.nn

    class VAE(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
            self.mean, self.log_var = nn.Linear(hidden, latent), nn.Linear(hidden, latent)
            self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                         nn.ReLU(), nn.Linear(hidden, inputs))
            self.decoded_log_var = nn.Parameter(torch.zeros(inputs))  # per feature

        def forward(self, x):
            h = self.encoder(x)
            mean, log_var = self.mean(h), self.log_var(h).clamp(-10, 10)
            z = mean + torch.randn_like(mean) * torch.exp(0.5 * log_var) if self.training else mean
            return self.decoder(z), mean, log_var

        def losses(self, x):
            """Per order: the reconstruction's negative log-likelihood and the latent KL divergence."""
            decoded, mean, log_var = self(x)
            spread = self.decoded_log_var.clamp(-10, 10)
            nll = 0.5 * ((decoded - x) ** 2 / spread.exp() + spread).sum(dim=1)
            kl = -0.5 * (1 + log_var - mean ** 2 - log_var.exp()).sum(dim=1)
            return nll, kl

    return VAE()


@dataclass
class Screen:
    """A trained model: feature schema, scaler, network, threshold."""

    schema: features.Schema
    mean: np.ndarray
    scale: np.ndarray
    network: object
    threshold: float
    info: dict  # architecture, metrics, training range: saved as they are

    def scores(self, x: np.ndarray, batch: int = 65536) -> np.ndarray:
        """Anomaly scores of feature rows (higher is more unusual)."""
        torch = _torch()
        z = (x - self.mean) / self.scale
        out = np.empty(len(z), dtype=np.float32)
        self.network.eval()
        with torch.inference_mode():
            for start in range(0, len(z), batch):
                chunk = torch.from_numpy(np.ascontiguousarray(z[start:start + batch], dtype=np.float32))
                nll, kl = self.network.losses(chunk)
                out[start:start + batch] = (nll + kl).numpy()
        return out

    def score_orders(self, orders: list[dict], clock: features.CustomerClock | None = None
                     ) -> tuple[np.ndarray, dict[int, str]]:
        """Each order's score (NaN where it has none), and by index why those have none."""
        rows, bad = features.matrix(orders, self.schema, clock)
        refused = dict(bad)
        scores = np.full(len(orders), np.nan, dtype=np.float32)
        usable = np.ones(len(orders), dtype=bool)
        usable[list(refused)] = False
        scores[usable] = self.scores(rows)
        return scores, refused

    def save(self, directory: Path) -> Path:
        """Write the artifact into `directory` atomically (a temporary sibling renamed)."""
        torch = _torch()
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
        try:
            torch.save(self.network.state_dict(), tmp / "model.pt")
            meta = {"artifact_version": ARTIFACT_VERSION, "schema": self.schema.to_dict(),
                    "scaler": {"mean": self.mean.tolist(), "scale": self.scale.tolist()},
                    "threshold": self.threshold, **self.info}
            (tmp / "model.json").write_text(json.dumps(meta, indent=1))
            if directory.exists():
                old = directory.with_name(f".{directory.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                directory.rename(old)
                tmp.rename(directory)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(directory)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return directory

    @classmethod
    def load(cls, directory: Path) -> "Screen":
        torch = _torch()
        directory = Path(directory)
        meta, schema = read_meta(directory)
        arch = meta["architecture"]
        network = _network(len(schema.names), arch["hidden"], arch["latent"])
        network.load_state_dict(torch.load(directory / "model.pt", weights_only=True))
        network.eval()
        info = {k: v for k, v in meta.items()
                if k not in {"artifact_version", "schema", "scaler", "threshold"}}
        return cls(schema, np.asarray(meta["scaler"]["mean"], dtype=np.float32),
                   np.asarray(meta["scaler"]["scale"], dtype=np.float32), network,
                   float(meta["threshold"]), info)


def read_meta(directory: Path) -> tuple[dict, features.Schema]:
    """model.json of an artifact this code can score with, and its feature schema (else an
    error that says to retrain)."""
    try:
        meta = json.loads((Path(directory) / "model.json").read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no model in {directory}: train one (opsctl jobs train-vae)") from None
    if meta.get("artifact_version") != ARTIFACT_VERSION:
        raise ValueError(f"model artifact version {meta.get('artifact_version')} in {directory} "
                         f"is not {ARTIFACT_VERSION}: retrain it (opsctl jobs train-vae)")
    return meta, features.Schema.from_dict(meta["schema"])  # checks the schema's version


def train(orders: list[dict], *, history: list[dict] | None = None, epochs: int = 30, seed: int = 7,
          hidden: int = 64, latent: int = 4, target_fpr: float = 0.01, batch_size: int = 256,
          beta: float = 0.1, on_epoch: Callable[[int, int, float], None] | None = None) -> Screen:
    """A Screen trained on `orders` (taken as normal): 80 % to fit, 20 % to set the threshold.
    `history`: every order of the period (anomalies too) for the customers' recent-order
    counts, as scoring will see them; `orders` by default."""
    torch = _torch()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    schema = features.Schema.learn(orders)
    x, bad = features.matrix(orders, schema, features.CustomerClock.from_orders(history or orders))
    if len(x) < 50:
        raise ValueError(f"only {len(x)} usable orders to train on ({len(bad)} unusable): need 50 or more")
    order = rng.permutation(len(x))
    cut = int(len(x) * 0.8)
    fit, held_out = x[order[:cut]], x[order[cut:]]
    mean = fit.mean(axis=0)
    scale = np.where(fit.std(axis=0) > 1e-6, fit.std(axis=0), 1.0).astype(np.float32)
    data = torch.from_numpy((fit - mean) / scale)
    network = _network(x.shape[1], hidden, latent)
    optimiser = torch.optim.Adam(network.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    started, loss_value = time.perf_counter(), float("nan")
    for epoch in range(1, epochs + 1):
        network.train()
        total = 0.0
        for index in torch.randperm(len(data), generator=generator).split(batch_size):
            nll, kl = network.losses(data[index])
            loss = (nll + beta * kl).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += loss.item() * len(index)
        loss_value = total / len(data)
        if on_epoch:
            on_epoch(epoch, epochs, loss_value)
    screen = Screen(schema, mean.astype(np.float32), scale, network, 0.0, {})
    held_scores = screen.scores(held_out)
    screen.threshold = float(np.quantile(held_scores, 1 - target_fpr))
    times = sorted(t for t in map(features.created_at_or_none, orders) if t is not None)
    screen.info = {
        "architecture": {"kind": "vae", "inputs": x.shape[1], "hidden": hidden, "latent": latent},
        "training": {"orders": len(orders), "unusable": len(bad), "fit": len(fit), "threshold_set": len(held_out),
                     "epochs": epochs, "seed": seed, "beta": beta, "target_fpr": target_fpr,
                     "final_loss": round(loss_value, 5), "seconds": round(time.perf_counter() - started, 2),
                     "from": _iso(times[0]) if times else None, "to": _iso(times[-1]) if times else None},
        "metrics": {"held_out_fpr": float((held_scores > screen.threshold).mean()),
                    "held_out_score_p50": float(np.median(held_scores))},
    }
    return screen


def _iso(timestamp: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).isoformat()
