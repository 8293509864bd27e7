"""Target-class selection for stage 1 (TensorFlow-free).

For each test image the model's logits decide the targets, as the original
tool did (SPEC section 2): least likely (lowest logit), top-2 (second highest
logit), random (uniform over the classes that are neither the prediction nor
the least-likely nor the top-2 class), user-given classes, or every class
(untargeted CLEVER). Images the model misclassifies are skipped.
"""
from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from common import TargetKind, ToolError, derived_seed, info_string

log = logging.getLogger("clever.utils")

# Separates the random-target stream from the sampling streams of an image.
_RANDOM_TARGET_STREAM = 0x7A46


@dataclass(frozen=True)
class Target:
    """One target class of one image: the class index and the file's info."""

    label: int
    kind: TargetKind
    info: str


@dataclass
class ImageTask:
    """An image to score and the targets chosen for it.

    ``image``: float32 array of the model's input shape (no batch axis), in
    the data range. ``logits``: float32 [num_classes] at the image.
    """

    img_id: int
    image: np.ndarray
    true_label: int
    predicted: int
    logits: np.ndarray
    targets: list[Target] = field(default_factory=list)
    seq_no: int = 0

    @property
    def correct(self) -> bool:
        return self.true_label == self.predicted


def select_targets(logits: np.ndarray, kinds: Sequence[TargetKind], seed: int, img_id: int,
                   user_targets: Sequence[int] | None = None,
                   excluded: Sequence[int] = ()) -> list[Target]:
    """Choose the target classes of one image from its logits.

    Args:
        logits: [num_classes] logits at the clean image.
        kinds: which kinds of targets to produce, in the original's order
            (least, top2, random; ``ALL`` gives every class; ``USER`` with
            ``user_targets`` gives exactly those classes instead).
        seed, img_id: seed the random target so that it is reproducible and
            does not depend on which other images were processed.
        user_targets: class indices for ``TargetKind.USER`` (from ``--ids``).
        excluded: classes never used as targets (e.g. a background class 0).

    Returns:
        Targets, never the predicted class, without duplicates per kind.
    """
    logits = np.asarray(logits, dtype=np.float64).ravel()
    num_classes = logits.size
    predicted = int(np.argmax(logits))
    allowed = [j for j in range(num_classes) if j not in set(excluded)]
    if TargetKind.ALL in kinds:
        return [Target(j, TargetKind.ALL, info_string(TargetKind.ALL, j))
                for j in allowed if j != predicted]
    if TargetKind.USER in kinds and user_targets:
        # As in the original tool, classes listed for an image replace the automatic ones.
        chosen = []
        for j in user_targets:
            if not 0 <= int(j) < num_classes:
                raise ToolError(f"--ids: target class {j} of image {img_id} is not in "
                                f"0..{num_classes - 1}")
            if int(j) != predicted and all(t.label != int(j) for t in chosen):
                chosen.append(Target(int(j), TargetKind.USER, "user"))
        return chosen
    # argmin/argsort over the allowed classes only, so a background class is never chosen.
    order = sorted(allowed, key=lambda j: logits[j])
    least = order[0]
    top2 = order[-2] if order[-1] == predicted else order[-1]
    chosen: list[Target] = []
    if TargetKind.LEAST in kinds:
        chosen.append(Target(least, TargetKind.LEAST, "least"))
    if TargetKind.TOP2 in kinds:
        chosen.append(Target(top2, TargetKind.TOP2, "top2"))
    if TargetKind.RANDOM in kinds:
        pool = [j for j in allowed if j not in (predicted, least, top2)]
        if not pool:  # three or fewer classes: fall back to any non-predicted class
            pool = [j for j in allowed if j != predicted]
        rng = np.random.default_rng(derived_seed(seed, img_id, _RANDOM_TARGET_STREAM))
        chosen.append(Target(int(pool[rng.integers(len(pool))]), TargetKind.RANDOM, "random"))
    return chosen


def generate_data(test_data: np.ndarray, test_labels: np.ndarray, logits: np.ndarray,
                  ids: Sequence[int], kinds: Sequence[TargetKind], seed: int,
                  user_targets: dict[int, list[int]] | None = None,
                  excluded: Sequence[int] = (), label_offset: int = 0) -> list[ImageTask]:
    """Build the stage-1 work list.

    Args:
        test_data: [N, ...] images; test_labels: [N, num_labels] one-hot.
        logits: [len(ids), num_classes] model logits of ``test_data[ids]``.
        ids: image indices to examine, in order.
        label_offset: added to a dataset label to get the model's class index
            (1 for 1001-output ImageNet models with a background class).

    Returns one :class:`ImageTask` per examined image, misclassified ones
    included (with no targets) so the caller can report them.
    """
    tasks = []
    for seq_no, (img_id, row) in enumerate(zip(ids, logits), start=1):
        true_label = int(np.argmax(test_labels[img_id])) + label_offset
        predicted = int(np.argmax(row))
        task = ImageTask(int(img_id), test_data[img_id], true_label, predicted,
                         np.asarray(row, np.float32), seq_no=seq_no)
        if task.correct:
            task.targets = select_targets(row, kinds, seed, int(img_id),
                                          (user_targets or {}).get(int(img_id)), excluded)
        tasks.append(task)
    return tasks


def datagen_line(task: ImageTask) -> str:
    """The original tool's ``[DATAGEN][L1]`` line for one examined image."""
    return ("[DATAGEN][L1] no = {}, true_id = {}, true_label = {}, predicted = {}, "
            "correct = {}, seq = {}, info = {}").format(
                task.seq_no, task.img_id, task.true_label, task.predicted, task.correct,
                [t.label for t in task.targets], [t.info for t in task.targets])


def read_ids_file(path: str) -> tuple[list[int], dict[int, list[int]]]:
    """Read an ``--ids`` CSV: one image per row, ``id[,target,target...]``.

    A first row that is not numeric is taken as a header. Returns the ids in
    file order and, for rows that list targets, id -> target classes.
    """
    if not os.path.isfile(path):
        raise ToolError(f"--ids: file {path} does not exist")
    ids: list[int] = []
    targets: dict[int, list[int]] = {}
    with open(path, newline="") as fh:
        for lineno, row in enumerate(csv.reader(fh), start=1):
            cells = [c.strip() for c in row if c.strip()]
            if not cells or cells[0].startswith("#"):
                continue
            try:
                values = [int(c) for c in cells]
            except ValueError:
                if lineno == 1:
                    continue  # header
                raise ToolError(f"{path}:{lineno}: expected integers 'id[,target,...]', "
                                f"got {','.join(cells)!r}")
            if values[0] < 0:
                raise ToolError(f"{path}:{lineno}: negative image id {values[0]}")
            ids.append(values[0])
            if len(values) > 1:
                targets.setdefault(values[0], []).extend(values[1:])
    if not ids:
        raise ToolError(f"--ids: file {path} lists no image ids")
    return ids, targets
