"""Which labels of a dataset name a class of the model, and which class.

A model with n > 1 outputs has the classes 0 .. n - 1. A model with one output s is a binary classifier (class 1
when s > 0): its labels are 0 and 1, or -1 and +1, the convention of deel-lip's binary (HKR) examples, read as
0 and 1. Which of the two a dataset uses is decided once, from all its labels, when it is checked against the
model (``check_fits``), so that every batch, every process of a sharded run and a resumed run read it alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: the message's tail for a label a one-output model cannot read
BINARY_LABELS = "labels must be 0 and 1, or -1 and +1 (deel-lip's convention)"


@dataclass(frozen=True)
class Labels:
    """The classes a model's labels may name: ``num_classes`` of them; ``binary`` for a one-output model, whose
    dataset may label with -1 and +1 (``plus_minus``: -1 is read as class 0)."""

    num_classes: int
    binary: bool = False
    plus_minus: bool = False

    def bad(self, y: np.ndarray) -> np.ndarray:
        """Mask of the labels that name no class of the model."""
        if self.plus_minus:
            return (y != -1) & (y != 1)
        return (y < 0) | (y >= self.num_classes)

    def classes(self, y: np.ndarray) -> np.ndarray:
        """The class indices of valid labels (-1 read as 0 under the -1/+1 convention)."""
        return np.where(y == -1, 0, y) if self.plus_minus else y

    def problem(self, label: int) -> str:
        """Why ``label`` names no class, for an error naming its sample."""
        if self.binary:
            return f"label {label}, but the model has one output (a binary classifier): {BINARY_LABELS}"
        return f"label {label}, but the model has {self.num_classes} classes (0..{self.num_classes - 1})"

    @property
    def note(self) -> str | None:
        """What the report says about the labels, when they were read other than as class indices."""
        if not self.plus_minus:
            return None
        return ("labels -1 and +1 (deel-lip's convention for one-output models) were read as classes 0 and 1 "
                "(class 1 when the logit is positive)")
