"""Make your own PyTorch model Bayesian and train it in your own loop with Adversarial Sampling.

Nothing here comes from asbnn's model registry or training loop: a small CNN written below, a plain
`torch.utils.data.DataLoader`, a plain Adam loop. asbnn contributes three calls: `Posterior(model)`
(a mean-field Gaussian over the model's conv/linear weights), `bayes_loss` (the loss of the
paper, eq. 3) and `sampled_predictions`/`summarize` (K sampled models, each held fixed over the test set).

    python docs/examples/own_model.py --data-root ../shared/data --steps 400
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from asbnn import ASConfig, Posterior, PosteriorConfig, bayes_loss
from asbnn.build import subset
from asbnn.data import ArrayDataset, DeviceLoader, dataset_info, load_dataset
from asbnn.evaluate import sampled_predictions, summarize
from asbnn.export import load_model, save_model


class SmallCNN(nn.Module):
    """Your model: any nn.Module works, asbnn never rewrites its layers."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Linear(16 * 7 * 7, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def to_tensors(data: ArrayDataset, mean: float, std: float) -> TensorDataset:
    """uint8 (N, 28, 28, 1) images to normalised float (N, 1, 28, 28), as your own pipeline would."""
    images = torch.from_numpy(data.images).permute(0, 3, 1, 2).float().div(255).sub(mean).div(std)
    return TensorDataset(images, torch.from_numpy(data.labels))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", help="folder holding fashion-mnist/ (else $ASBNN_DATA)")
    parser.add_argument("--steps", type=int, default=400, help="training steps of batch 64")
    parser.add_argument("--samples", type=int, default=20, help="sampled models to evaluate")
    parser.add_argument("--test-size", type=int, default=2000, help="test images to evaluate them on")
    parser.add_argument("--save", type=Path, help="also write the posterior to this .safetensors file")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    info = dataset_info("fashion-mnist")
    train_arrays = load_dataset("fashion-mnist", "train", args.data_root)
    train_set = to_tensors(train_arrays, info.mean[0], info.std[0])
    loader = DataLoader(train_set, batch_size=64, shuffle=True)

    # One call makes the model Bayesian; its own initial weights become the posterior means. The
    # initial sigma must sit well below the weights' scale (PyTorch initialises the head's to
    # +-1/sqrt(784) = 0.036): with 0.05 the noise drowns the signal and training stalls.
    posterior = Posterior(SmallCNN(), PosteriorConfig(mu_init="module", init_sigma=0.01))
    optimizer = torch.optim.Adam(posterior.parameters(), lr=1e-2)
    kl_weight = 1 / (100 * len(train_set))  # the paper's beta
    step = 0
    while step < args.steps:
        for x, y in loader:
            parts = bayes_loss(posterior, x, y, kl_weight=kl_weight, config=ASConfig())  # VI + AS
            optimizer.zero_grad()
            parts.total.backward()
            optimizer.step()
            step += 1
            if step % 100 == 0 or step == args.steps:
                print(f"step {step}: loss {parts.total.item():.3f}")
            if step == args.steps:
                break

    # K sampled models, each one eps held fixed over the whole test set, and their ensemble.
    test = subset(load_dataset("fashion-mnist", "test", args.data_root), args.test_size)
    test_loader = DeviceLoader(test, min(1000, len(test)), train=False, mean=info.mean, std=info.std, augment=False)
    result = summarize(sampled_predictions(posterior, test_loader, num_samples=args.samples, seed=0))
    sampled, ensemble = result["sampled"], result["ensemble"]
    print(f"{args.samples} sampled models: lowest {100 * sampled['lowest']:.2f} %, "
          f"highest {100 * sampled['highest']:.2f} %, ensemble {100 * ensemble['accuracy']:.2f} % "
          f"(posterior mean {100 * result['posterior_mean']['accuracy']:.2f} %); "
          f"mean epistemic uncertainty {result['uncertainty']['epistemic']:.4f} nats")

    if args.save:
        save_model(posterior, args.save, info=info, classes=test.classes)
        # The file holds tensors and metadata only; give back a fresh bare model to rebuild it.
        loaded = load_model(args.save, model=SmallCNN())
        x, _ = next(test_loader.batches())
        with torch.no_grad():
            assert torch.equal(loaded(x, "mean"), posterior(x, "mean"))
        print(f"saved to {args.save}; load it with load_model({str(args.save)!r}, model=SmallCNN())")
    return result


if __name__ == "__main__":
    main()
