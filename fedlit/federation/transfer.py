"""Cross-dataset and cross-domain transfer of the global prompt (``eval.protocol=transfer``).

Each entry of ``eval.transfer_datasets`` names a target the clients never train on: ``name`` (the whole test split
of another dataset), ``name:domain`` (the test images of one domain of a domain dataset) or ``shapes:<brightness>``
(the shapes test images rendered at another brightness: the same classes in another domain). A target is built by
the data registry with the run's ``data`` keys (root, download, the shapes keys) and the backbone's transform, and
its test features are cached like the training dataset's. Every evaluated round, the method's global model
(:meth:`~fedlit.algorithms.Algorithm.global_plan`) is loaded into a module of the same method built for the
target's class names and evaluated on the target's test set: one text-tower pass and a matrix product.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from fedlit.algorithms import Algorithm
from fedlit.backbone import Backbone
from fedlit.config import Config, parse_transfer_target
from fedlit.data.base import DatasetBundle
from fedlit.data.features import POOLED, FeatureCache
from fedlit.data.registry import build_dataset
from fedlit.errors import UserError
from fedlit.federation.client_data import ClientData, cached_features
from fedlit.federation.trainer import LocalTrainer
from fedlit.state import ClientState


@dataclass
class TransferTarget:
    """One ``eval.transfer_datasets`` entry: its dataset, the positions ``index (M,)`` of its samples in the test
    split and their labels ``(M,)``, and the cached test features of the whole split per feature kind (``(N, D)``
    pooled, ``(N, P+1, D)`` patches; empty when features are not cached: images are encoded at evaluation)."""

    name: str
    bundle: DatasetBundle
    index: Tensor
    labels: Tensor
    features: dict[str, Tensor] = field(default_factory=dict)

    @property
    def classnames(self) -> list[str]:
        """The target's class names, aligned with its labels."""
        return self.bundle.classnames

    def inputs(self, kind: str = POOLED) -> Tensor:
        """The target's test inputs: features of ``kind`` ``(M, ...)``, or preprocessed images when not cached."""
        if kind in self.features:
            return self.features[kind][self.index]
        return torch.stack([self.bundle.test[i][0] for i in self.index.tolist()])


def target_data_config(cfg: Config, entry: str):
    """The ``data`` section a target is built with: the run's, with the target's dataset name (and for
    ``shapes:<b>`` its brightness)."""
    name, domain = parse_transfer_target(entry)
    brightness = float(domain) if name == "shapes" and domain is not None else cfg.data.shapes_brightness
    return replace(cfg.data, name=name, shapes_brightness=brightness)


def build_transfer_targets(cfg: Config, backbone: Backbone, device: torch.device, cache: FeatureCache,
                           kinds: Sequence[str], progress: bool = False) -> list[TransferTarget]:
    """The targets of ``eval.transfer_datasets`` (none unless ``eval.protocol=transfer``), with their test
    features of every kind in ``kinds`` cached when ``perf.cache_features`` is on. A missing dataset is a
    :class:`UserError` from its builder (before anything is written)."""
    if cfg.eval.protocol != "transfer":
        return []
    targets = []
    for entry in cfg.eval.transfer_datasets:
        name, domain = parse_transfer_target(entry)
        bundle = build_dataset(target_data_config(cfg, entry), backbone.preprocess)
        labels = torch.as_tensor(bundle.test.targets, dtype=torch.long)
        index = torch.arange(len(labels))
        if domain is not None and name != "shapes":
            domains = torch.as_tensor(bundle.test.domains, dtype=torch.long)
            index = torch.nonzero(domains == bundle.domain_names.index(domain), as_tuple=True)[0]
            if len(index) == 0:
                raise UserError(f"eval.transfer_datasets entry {entry!r}: {name} has no test image of {domain}")
        features = ({kind: cached_features(cache, backbone, bundle, "test", device, kind=kind,
                                           num_workers=cfg.data.num_workers, progress=progress)
                     for kind in dict.fromkeys([POOLED, *kinds])} if cfg.perf.cache_features else {})
        targets.append(TransferTarget(entry, bundle, index, labels[index], features))
    return targets


@dataclass
class TransferModel:
    """A target and the trainer around a module of the run's method built for the target's class names (None when
    the method has no global model: its transfer numbers are None)."""

    target: TransferTarget
    trainer: LocalTrainer | None


def transfer_models(algorithm: Algorithm, module, initial: ClientState, data: ClientData,
                    targets: Sequence[TransferTarget], *, seed: int, device: torch.device,
                    fabric=None) -> list[TransferModel]:
    """One :class:`TransferModel` per target for ``algorithm`` (whose process module is ``module`` and initial
    client state ``initial``). The target modules are built without touching torch's global RNG; UserError when
    the method's model has a tensor whose shape depends on the class count (it cannot move to other classes)."""
    if not targets:
        return []
    if algorithm.global_plan(algorithm.init_server(initial), initial) is None:
        return [TransferModel(t, None) for t in targets]
    models = []
    for target in targets:
        with torch.random.fork_rng(devices=[]):
            other = algorithm.build_module(module.backbone, target.classnames).to(device)
        shapes = {n: tuple(t.shape) for n, t in other.client_state().items()}
        ours = {n: tuple(t.shape) for n, t in initial.params.items()}
        if shapes != ours:
            raise UserError(f"eval.protocol=transfer: {algorithm.name}'s model depends on the class count (its "
                            f"tensors {shapes} for {target.name} differ from {ours}); it cannot be moved to "
                            "other class names")
        trainer = LocalTrainer(other, data, seed=seed, local_epochs=1, device=device, fabric=fabric)
        models.append(TransferModel(target, trainer))
    return models
