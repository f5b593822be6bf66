"""Class-wise unlearning for PyTorch image classifiers (the CMF and MeGU papers' setting).

- ``model``: the small CNN (``features`` + ``head``), the training loop, the training script
  and the shipped weights;
- ``cmf``: switching a model to the CMF head and the CMF unlearning variants;
- ``methods``: Retrain, fine-tune, Random-label, NegGrad+, SalUn; ``megu``: MeGU;
- ``demo``: the table and plot of ``unlearn-kernels demo --track classifier``.

The layers below hold what the track shares with the rest of the package: the data (the
scikit-learn digits split, torchvision-style datasets on disk, the forgotten classes) in
:mod:`unlearn_kernels.data.class_split`, the CMF cosine head in
:mod:`unlearn_kernels.models.cmf_head`, and the metrics (UA, RA, TA, MIA-efficacy, linear-probe /
nearest-class-mean forget accuracy, relearning) in :mod:`unlearn_kernels.eval.classifier`.
"""

from ..data.class_split import ClassSplit, digits_split, torchvision_split
from .cmf import CMFHead, CMFNegGradPlus, CMFRandomLabel, rebuild_cmf_head, to_cmf
from .megu import MeGU, MeGUConfig, transition_matrix
from .methods import (ClassifierConfig, ClassifierMethod, FineTune, NegGradPlus, NegGradPlusConfig, RandomLabel,
                      Retrain, SalUn, SalUnConfig)
from .model import SmallCNN, load_digits_cnn

registry: dict[str, type[ClassifierMethod]] = {
    cls.name: cls for cls in (Retrain, FineTune, RandomLabel, NegGradPlus, SalUn, CMFRandomLabel, CMFNegGradPlus, MeGU)
}

__all__ = ["CMFHead", "CMFNegGradPlus", "CMFRandomLabel", "ClassSplit", "ClassifierConfig", "ClassifierMethod",
           "FineTune", "MeGU", "MeGUConfig", "NegGradPlus", "NegGradPlusConfig", "RandomLabel", "Retrain", "SalUn",
           "SalUnConfig", "SmallCNN", "digits_split", "load_digits_cnn", "rebuild_cmf_head", "registry", "to_cmf",
           "torchvision_split", "transition_matrix"]
