"""The example's data: scikit-learn's bundled handwritten digits (no download), split and standardised by
this code, as a (train, test) pair of torch datasets: a data loader of the user's, not OrMo-PS's.

`--dataset examples.byom.data:load` names it for ps-server, ps-sim, ps-launch, ps-worker and ps-eval.
"""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset


def load(data_dir: str | None = None) -> tuple[TensorDataset, TensorDataset]:
    """1347 training and 450 test images (1x8x8, float32, standardised by the training set), labels 0..9."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(digits.images, digits.target, test_size=0.25,
                                                        stratify=digits.target, random_state=0)
    x_train, x_test = (torch.tensor(x, dtype=torch.float32).unsqueeze(1) for x in (x_train, x_test))
    mean, std = x_train.mean(), x_train.std()
    return (TensorDataset((x_train - mean) / std, torch.tensor(y_train)),
            TensorDataset((x_test - mean) / std, torch.tensor(y_test)))
