"""IBM ART's extraction attacks over the lab's oracles: an attacker implementation that no one here wrote.

``art_copycat`` is ART's :class:`~art.attacks.extraction.CopycatCNN`, ``art_knockoff`` its
:class:`~art.attacks.extraction.KnockoffNets` with the random sampling strategy. The victim side is one of our
oracles (:class:`~mlflow_project.lab.oracles.LocalOracle` or :class:`~mlflow_project.lab.oracles.HTTPOracle`,
so the oracle's budget is enforced and every query is counted) behind an ART ``BlackBoxClassifier`` whose
``predict`` calls it; the thieved side is the clone wrapped in an ART ``PyTorchClassifier`` (SGD with the
attack's lr, momentum and weight decay; cross-entropy, which ART trains on probability rows as they are and on
one-hot rows as class indices), fitted by ART's own loop (``nb_epochs = epochs``, ``batch_size_fit =
batch_size``; no learning-rate schedule).

One query pass, two clones (the attackers as a set, see :mod:`mlflow_project.lab.attacks`): the soft clone is
ART's attack with ``use_probability=True``; its top-1 twin is the same ART attack with ``use_probability=False``
run against a ``BlackBoxClassifier`` that looks the recorded answers up (ART's lookup mode), so the victim is
not queried twice. ART draws its queries with NumPy's global generator; it is seeded with the attack's seed.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn


def _classifier(model: nn.Module, cfg, input_shape: tuple[int, ...], num_classes: int):
    from art.estimators.classification import PyTorchClassifier

    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), optimizer=opt, input_shape=input_shape,
                             nb_classes=num_classes, device_type="cpu")


def _attack(name: str, victim, cfg, nb_stolen: int, use_probability: bool):
    from art.attacks.extraction import CopycatCNN, KnockoffNets

    common = {"batch_size_fit": cfg.batch_size, "batch_size_query": cfg.query_batch_size, "nb_epochs": cfg.epochs,
              "nb_stolen": nb_stolen, "use_probability": use_probability}
    if name == "art_copycat":
        return CopycatCNN(classifier=victim, **common)
    if name == "art_knockoff":
        return KnockoffNets(classifier=victim, sampling_strategy="random", verbose=False, **common)
    raise ValueError(f"attack: {name!r} is not an ART attack; allowed: art_copycat, art_knockoff")


def run_art_attack(oracle, pool: torch.Tensor, make_clone: Callable[[], nn.Module], cfg, twin: bool = True):
    """Run ``cfg.name`` (art_copycat | art_knockoff) against ``oracle`` with the query set ``pool``; return an
    :class:`~mlflow_project.lab.attacks.AttackResult` with the soft clone and (``twin``) its top-1 twin."""
    from art.estimators.classification import BlackBoxClassifier

    from mlflow_project.lab.attacks import AttackResult

    input_shape = tuple(pool.shape[1:])
    with torch.no_grad():
        num_classes = make_clone()(pool[:1]).shape[1]
    asked: list[np.ndarray] = []
    answered: list[np.ndarray] = []

    def predict(x: np.ndarray) -> np.ndarray:
        probs = oracle(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy().astype(np.float32)
        asked.append(np.array(x, dtype=np.float32))
        answered.append(probs)
        return probs

    victim = BlackBoxClassifier(predict, input_shape, num_classes, clip_values=None)
    nb_stolen = min(cfg.budget, len(pool))
    x_np = pool.numpy().astype(np.float32)

    def steal(model_victim, use_probability: bool) -> nn.Module:
        np.random.seed(cfg.seed)  # noqa: NPY002 - ART draws from the global generator
        torch.manual_seed(cfg.seed)
        clone = make_clone()
        attack = _attack(cfg.name, model_victim, cfg, nb_stolen, use_probability)
        attack.extract(x_np, thieved_classifier=_classifier(clone, cfg, input_shape, num_classes))
        return clone.eval()

    soft = steal(victim, use_probability=True)
    x = torch.from_numpy(np.concatenate(asked)) if asked else torch.empty(0, *input_shape)
    y = torch.from_numpy(np.concatenate(answered)) if answered else torch.empty(0, num_classes)
    top1 = None
    if twin:
        lookup = BlackBoxClassifier((x.numpy(), y.numpy()), input_shape, num_classes, clip_values=None)
        top1 = steal(lookup, use_probability=False)
    return AttackResult(clone=soft, queries=0, transfer_x=x, transfer_y=y, rounds=1,
                        history=[{"round": 0, "transfer_size": len(x), "loss": float("nan")}], top1_clone=top1)
