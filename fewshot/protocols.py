"""The evaluation protocols of the field, defined once: few-shot (all classes), base-to-novel (train on the
base half, test base and novel), cross-dataset and domain generalization (train on a source, test targets).
The data layer splits by them; specs, trials and methods name them from here."""

from __future__ import annotations

from typing import Literal

PROTOCOLS = ("fewshot", "base2novel", "cross_dataset", "domain_generalization")
#: the protocols that evaluate on datasets other than the training one (``targets``)
TRANSFER_PROTOCOLS = ("cross_dataset", "domain_generalization")
#: protocols whose evaluation classes are not (all) the training classes
OTHER_CLASS_PROTOCOLS = ("base2novel", *TRANSFER_PROTOCOLS)
Protocol = Literal[PROTOCOLS]
